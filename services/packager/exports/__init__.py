"""Exports: a project's images copied to a bucket of its own (shared/export_destinations.py), by the
packager, from keys.EXPORTS_STREAM. worker.py does the copying, layout.py names the objects,
manifests.py writes each job's manifest, bucket.py talks to the destination."""
