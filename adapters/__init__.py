"""Channel adapters: sans-IO translators between the canonical model and each channel's protocol.

An adapter builds `WireRequest`s and parses `WireResponse`s; `router.transport` does the sending.
Adapters import only `router.model` and `router.errors`.
"""
