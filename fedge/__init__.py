"""fedge: federated learning for edge devices over MQTT. Library packages: `fedge.models`,
`fedge.edge_agent`, `fedge.hub`, `fedge.firmware_profiles`; the command line is `fedge.cli`."""
