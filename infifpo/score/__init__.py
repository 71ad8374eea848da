"""Stage `score`: every response's log-probability under the pivot and each source (`stage`), and the
per-model and assembled outputs with their stats (`output`)."""
