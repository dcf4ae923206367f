"""Region filter: a subsequence keeping exactly the channels licensed for the country and currency."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from policies import region
from policies.base import PolicyEnv
from router.model import Candidate, Capabilities, RouteContext

COUNTRIES = ["US", "DE", "JP", "CN"]
CURRENCIES = ["USD", "EUR", "JPY", "CNY"]

candidates = st.lists(
    st.builds(
        lambda i, cc, cur: Candidate(
            name=f"c{i}", adapter="sandbox", capabilities=Capabilities(),
            licensed_countries=cc, licensed_currencies=cur,
        ),
        st.integers(0, 100),
        st.none() | st.frozensets(st.sampled_from(COUNTRIES)),
        st.none() | st.frozensets(st.sampled_from(CURRENCIES)),
    ),
    max_size=8,
    unique_by=lambda c: c.name,
).map(tuple)
contexts = st.builds(
    lambda cc, cur: RouteContext(payment_id="p", merchant_id="m", amount=1, currency=cur, country=cc, method="card"),
    st.sampled_from(COUNTRIES), st.sampled_from(CURRENCIES),
)


def is_subsequence(sub: tuple[Candidate, ...], seq: tuple[Candidate, ...]) -> bool:
    it = iter(seq)
    return all(any(x is y for y in it) for x in sub)


@given(contexts, candidates)
def test_a_subsequence_of_exactly_the_licensed_channels(ctx: RouteContext, cands: tuple[Candidate, ...]) -> None:
    out = region.build(region.Params(), PolicyEnv())(ctx, cands)
    assert is_subsequence(out, cands)
    for c in cands:
        country_ok = c.licensed_countries is None or ctx.country in c.licensed_countries
        currency_ok = c.licensed_currencies is None or ctx.currency in c.licensed_currencies
        assert (c in out) == (country_ok and currency_ok)


def test_unrestricted_and_restricted_channels() -> None:
    ctx = RouteContext(payment_id="p", merchant_id="m", amount=1, currency="CNY", country="CN", method="card")
    free = Candidate(name="free", adapter="x", capabilities=Capabilities())
    cn = Candidate(name="cn", adapter="x", capabilities=Capabilities(), licensed_countries=frozenset({"CN"}))
    eu = Candidate(name="eu", adapter="x", capabilities=Capabilities(), licensed_countries=frozenset({"DE"}))
    usd = Candidate(name="usd", adapter="x", capabilities=Capabilities(), licensed_currencies=frozenset({"USD"}))
    assert region.RegionFilter()(ctx, (free, cn, eu, usd)) == (free, cn)
    assert region.RegionFilter()(ctx, ()) == ()
