"""The hub: rounds, aggregation, persistence, evaluation, and the fleet simulator."""
