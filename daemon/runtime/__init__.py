"""The running daemon: start-up repair, its threads, the state-folder lock."""
