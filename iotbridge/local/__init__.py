"""The architecture on one machine: official emulators, Mosquitto and the local BigQuery."""
