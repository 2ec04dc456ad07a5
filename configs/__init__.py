"""Shared pydantic schemas: the quantization scheme, the wire protocol, the HTTP API, role configs."""
