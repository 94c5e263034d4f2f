"""pgdispatch: reliable outbound integrations, straight from PostgreSQL."""
