"""Replica routing: the servers and the choice per borrow (``router``), their health
(``replica_health``)."""
