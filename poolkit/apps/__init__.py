"""Application helpers on top of the pools: money movement, SQLAlchemy engines, migrations' direct URL, the provider."""
