"""The per-process pool (``connection_pool.ConnectionPool``), the concerns it mixes in
(``slots``, ``sessions``, ``sharing``, ``upkeep``), its borrowers and its maintenance
thread."""
