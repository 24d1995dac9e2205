"""A tiny OpenEnv environment for trgrpo's OpenEnv adapter: "reply with the sum" (``server.py``)."""
