"""The instance's shared state (``shared_state``) and what moves between processes on it:
the budget, parked and exchanged connections, the doorbell, backend exits and outages."""
