"""Maker-checker governance: admins and roles, governed change requests with two-person TOTP-backed
approval, expiry, separation of duties, auto-approval of low-risk changes, and a hash-chained audit log.

Modules: `model` (values and `GovernanceConfig`), `store` (persistence, SQLite and PostgreSQL),
`audit` (the chain and its verifier), `service` (the rules), `appliers` (what applying does),
`api` (HTTP handlers and wiring), `cli` (`payroute admin ...`).
"""
