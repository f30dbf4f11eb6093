"""Runtime infrastructure beneath data, evaluation, similarity and training: processes and ranks
(:mod:`.distributed`), seeds, threads and devices (:mod:`.environment`), mixed precision (:mod:`.precision`)."""
