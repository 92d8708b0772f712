"""Ways into the field from other software: proxy mode, httpx transport, framework adapters.

Installed as ``stigmergy.integrations``; each integration is an optional extra.
"""
