"""Data preparation as pure functions: read sources, format examples (ids + loss mask), pack rows."""
