"""Writing a step: state -> sources (:mod:`.prepare`), the commit protocol (:mod:`.protocol`), async saves
(:mod:`.background`)."""
