"""The vmmu server: the KVM model (`kvm`) and its gRPC adapters (`rpc`)."""
