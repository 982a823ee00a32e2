"""Generated from proto/switchboard/v1 by scripts/gen_protos.sh; do not edit."""
