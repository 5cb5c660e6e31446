"""The admin API: IoT Core's device manager REST surface over the registry (docs/admin-api.md)."""
