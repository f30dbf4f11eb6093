"""Benchmarks of learners at equal compute: the grid (:mod:`.grid`), statistics (:mod:`.stats`), the report
(:mod:`.report`) and its plots (:mod:`.plots`)."""
