"""Several hosts and hard stops: PostgreSQL, races, restarts, recovery, fault injection, the
simulated GPU."""
