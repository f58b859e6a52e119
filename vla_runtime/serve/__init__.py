"""Serving: a policy behind openpi's websocket protocol (`vla-serve`), and a served policy as a local one
(`policy=remote`)."""
