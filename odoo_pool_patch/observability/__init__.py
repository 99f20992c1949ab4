"""What the instance looks like from outside: one view of it read from the shared state
(``instance_view``), rendered as Prometheus text (``metrics``) and as the dashboard's
figures (``dashboard``); ``odoo-pool top`` renders the same view. Imports the engine,
never imported by it."""
