"""The fleet simulator: virtual devices (the real agent), the fleet over MQTT or an in-memory
transport, centralised baselines, attack models and paper recipes. The only part of the hub that imports the device agent."""
