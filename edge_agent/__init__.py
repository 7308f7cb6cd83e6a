"""The device side: profiles, local training, MQTT agent and (torch-free) inference."""
