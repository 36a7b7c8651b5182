"""The HTTP API, one module per resource: each route parses, calls a store or a service, and shapes
the answer. Errors are raised as shared/errors.py kinds and answered by services/gateway/errors.py."""
