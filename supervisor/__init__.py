"""The stepvisor daemon: config, journal, scheduler, launcher, reaper, API server and main loop."""
