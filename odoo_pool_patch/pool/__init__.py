"""The per-process pool (``connection_pool.ConnectionPool``), its parts (``slots.Books``,
``sessions.SessionSteps``, ``sharing.Sharing``, ``upkeep.Upkeep``), its borrowers and its
maintenance thread."""
