"""PFVs on disk: per-shard extraction, committed parts, seekable shuffled training streams."""
