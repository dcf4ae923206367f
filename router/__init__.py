"""payroute: a multi-channel payment routing proxy.

`router` holds the canonical model, the pipeline, the stores and the HTTP app; `adapters` translate
to and from each channel's wire protocol; `policies` choose channels. Adapters and policies import
only `router.model` and `router.errors`.
"""

__version__ = "0.1.0"
