"""Reading committed steps back: which step (:mod:`.select`), the phases on every rank (:mod:`.reader`), and how
the stored tree meets the caller's state (:mod:`.walk`)."""
