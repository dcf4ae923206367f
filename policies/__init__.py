"""Routing policies: pure functions over an ordered tuple of candidate channels.

Filters return a subsequence; rankers return a permutation. They do no I/O: live state (breaker
state, later success rates and costs) reaches them as fields of the `Candidate` snapshot.
"""
