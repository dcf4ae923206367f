"""The money side: pricing, the double-entry ledger, settlement cycles and reconciliation.

Dependency direction: `router.money` imports `router.model`, `router.errors` and the fee engine of
`policies.cost`; nothing in `policies` or `adapters` imports `router.money`.
"""
