"""The state of record in Redis: one store per kind of thing, owning every key and script call for it."""
