"""The explicit list of adapters a config may name. Onboarding a channel adds one line here."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from adapters.adyen.adapter import AdyenAdapter
from adapters.alipay.adapter import AlipayAdapter
from adapters.sandbox.adapter import SandboxAdapter
from adapters.stripe.adapter import StripeAdapter
from adapters.wechatpay.adapter import WechatpayAdapter
from router.model import Capabilities, ChannelAdapter

AdapterFactory = Callable[[Mapping[str, str], Capabilities], ChannelAdapter]

ADAPTERS: Mapping[str, AdapterFactory] = {
    "sandbox": SandboxAdapter,
    "adyen": AdyenAdapter,
    "alipay": AlipayAdapter,
    "stripe": StripeAdapter,
    "wechatpay": WechatpayAdapter,
}


def create(kind: str, credentials: Mapping[str, str], capabilities: Capabilities) -> ChannelAdapter:
    return ADAPTERS[kind](credentials, capabilities)
