"""Network: the stack's own VPC and one regional subnet for every private workload.

Broker hosts, Dataflow workers and the Workbench instance have no external IP, so the subnet has Private Google
Access (without it they could not reach Pub/Sub, BigQuery, Bigtable or the Workbench proxy, and each of those
components fails the deploy on such a subnet). A custom-mode VPC rather than the project's ``default`` network:
``default`` may be absent (an org policy removes it) and its auto-created rules allow more than this stack needs.
Firewall rules stay in the components that need a port opened (broker: 8883 and health checks; pipeline: the
workers' shuffle ports), and the broker brings the Cloud NAT its hosts install packages through.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

import pulumi
import pulumi_gcp as gcp


@dataclass(frozen=True)
class NetworkArgs:
    project: str
    region: str
    prefix: str
    cidr: str = "10.20.0.0/20"
    flow_logs: bool = True
    depends_on: Sequence[pulumi.Resource] = ()  # the Compute API

    def __post_init__(self) -> None:
        net = ipaddress.ip_network(self.cidr)  # ValueError names a bad range
        if not net.is_private or net.prefixlen > 24:
            raise ValueError(f"subnet range {self.cidr} must be private and at least a /24")


class Network(pulumi.ComponentResource):
    """A custom-mode VPC and one subnet with Private Google Access in the stack's region."""

    vpc: gcp.compute.Network
    subnet: gcp.compute.Subnetwork  # what BrokerArgs (its id), PipelineArgs and WorkbenchArgs take

    def __init__(self, name: str, args: NetworkArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("gcp-iot-bridge:index:Network", name, None, opts)
        child = pulumi.ResourceOptions(parent=self, depends_on=list(args.depends_on))
        self.vpc = gcp.compute.Network(
            f"{name}-vpc", project=args.project, name=f"{args.prefix}-vpc", auto_create_subnetworks=False,
            routing_mode="REGIONAL", description="gcp-iot-bridge: broker hosts, Dataflow workers, Workbench",
            opts=child)
        self.subnet = gcp.compute.Subnetwork(
            f"{name}-subnet", project=args.project, region=args.region, name=f"{args.prefix}-{args.region}",
            network=self.vpc.id, ip_cidr_range=args.cidr, private_ip_google_access=True,
            log_config=gcp.compute.SubnetworkLogConfigArgs(
                aggregation_interval="INTERVAL_10_MIN", flow_sampling=0.5, metadata="INCLUDE_ALL_METADATA",
            ) if args.flow_logs else None,
            opts=child)
        self.register_outputs({"network": self.vpc.id, "subnetwork": self.subnet.id})
