"""The sandbox payment channel: a scriptable fake PSP served over real HTTP (see `server`)."""
