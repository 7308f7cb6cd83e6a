"""Built-in device profiles (YAML files beside this module); schema in edge_agent.profile."""
