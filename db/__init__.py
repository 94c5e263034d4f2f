"""Database access shared by every layer: errors, the server to use, the schema."""
