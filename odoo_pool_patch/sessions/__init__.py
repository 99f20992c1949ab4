"""What a server session carries: the pool's record of a connection (``conn_record``),
which statements leave session state and what clears it (``session_state``), the cursor
hooks that note it (``session_tracking``) and the per-thread commit count
(``commit_marks``)."""
