"""Generated gRPC and protobuf code. Do not edit."""
