"""The routing lab: discrete-event simulation of channels and traffic in virtual time.

`scenario` decodes and validates scenario YAML (errors carry paths); `sim` runs strategies (policy
chains through the production policy code, a static priority baseline and a hindsight oracle) over
seeded worlds; `report` turns results into a table, a JSON report and PNG plots; `cli` is the
`payroute lab` command. Nothing here sleeps or reads the wall clock: same seed, same report.
"""
