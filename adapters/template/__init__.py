"""A template channel adapter for the fictional JSON PSP "ExamplePay". Copy this package to start a new one.

`adapter.ExamplePayAdapter` is the behaviour (sans-IO: build requests, parse answers, verify callbacks),
`wire` the wire types, amount conversion and webhook signature helpers, `codes` the decline-code table.
It is deliberately NOT registered in adapters/registry.py; see docs/adding-a-channel.md.
"""
