"""Generated gRPC stubs for the Switchboard API (see proto/)."""
