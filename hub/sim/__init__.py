"""The fleet simulator: virtual devices (the real agent), the plain in-process loop, centralised
baselines, attack models and paper recipes. The only part of the hub that imports the device agent."""
