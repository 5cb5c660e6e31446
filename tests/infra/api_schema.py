"""Every resource input held against the schema of the GCP API call the provider makes with it.

The schemas are Google's own API discovery documents, as google-api-python-client ships them
(``googleapiclient/discovery_cache/documents/<api>.<version>.json``). Mock tests prove the program declares what we
meant; this proves GCP would accept it: an enum value the API does not know (``THROUGHPUT_BASED`` for
``FlexTemplateRuntimeEnvironment.autoscalingAlgorithm``), a name outside the schema's pattern, a duration or a count
outside the limit the API documents. Each of those fails ``pulumi up`` with HTTP 400, long after a preview passed.

Three tables, all data:

- ``MAPPING``: Pulumi resource type -> input path -> ``(document, schema, field)``, the field of the request body
  (or, for ``method:...``, the request parameter) the provider fills from that input. Input paths are the camelCase
  paths the provider receives; ``[]`` steps into each item of a list. Field paths may step through ``$ref``s and
  arrays the same way.
- ``LIMITS``: constraints the API documents in prose rather than in the schema (ranges, allowed values, name
  rules), each with the sentence of the field's description it comes from; a test checks that the sentence is
  still in the shipped document, so a limit cannot drift away from its source.
- ``NOT_COVERED``: the resource types the stacks declare that the mapping does not hold, each with the reason. A
  type in neither table fails the test, so a new resource type cannot slip past unchecked.

An empty string counts as unset: the provider does not send an empty optional field.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import googleapiclient

DOCUMENTS = Path(googleapiclient.__file__).parent / "discovery_cache" / "documents"

Target = tuple[str, str, str]  # (discovery document, schema or "method:resource.path.method", field path)

# IAM member resources: role and member land in a binding of the API's IAM policy (setIamPolicy). Every such
# target gets the IAM limits below.
IAM_TARGETS: list[Target] = []


def _iam(doc: str, schema: str = "Binding", prefix: str = "", **extra: Target) -> dict[str, Target]:
    role, member = (doc, schema, f"{prefix}role"), (doc, schema, f"{prefix}members[]")
    IAM_TARGETS.extend([role, member])
    return {"role": role, "member": member, **extra}


_DF_ENV = "FlexTemplateRuntimeEnvironment"
_DF_LAUNCH = "LaunchFlexTemplateParameter"
_MON = "monitoring.v3"
_RUN = "GoogleCloudRunV2Service"
_COND = "Condition"

_HEALTH_CHECK: dict[str, Target] = {path: ("compute.v1", "HealthCheck", path) for path in (
    "name", "checkIntervalSec", "timeoutSec", "healthyThreshold", "unhealthyThreshold", "httpHealthCheck.port",
    "httpHealthCheck.requestPath")}

MAPPING: dict[str, dict[str, Target]] = {
    "gcp:dataflow/flexTemplateJob:FlexTemplateJob": {
        "name": ("dataflow.v1b3", _DF_LAUNCH, "jobName"),
        "containerSpecGcsPath": ("dataflow.v1b3", _DF_LAUNCH, "containerSpecGcsPath"),
        "parameters": ("dataflow.v1b3", _DF_LAUNCH, "parameters"),
        "transformNameMapping": ("dataflow.v1b3", _DF_LAUNCH, "transformNameMappings"),
        "autoscalingAlgorithm": ("dataflow.v1b3", _DF_ENV, "autoscalingAlgorithm"),
        "ipConfiguration": ("dataflow.v1b3", _DF_ENV, "ipConfiguration"),
        "enableStreamingEngine": ("dataflow.v1b3", _DF_ENV, "enableStreamingEngine"),
        "maxWorkers": ("dataflow.v1b3", _DF_ENV, "maxWorkers"),
        "numWorkers": ("dataflow.v1b3", _DF_ENV, "numWorkers"),
        "machineType": ("dataflow.v1b3", _DF_ENV, "machineType"),
        "launcherMachineType": ("dataflow.v1b3", _DF_ENV, "launcherMachineType"),
        "serviceAccountEmail": ("dataflow.v1b3", _DF_ENV, "serviceAccountEmail"),
        "network": ("dataflow.v1b3", _DF_ENV, "network"),
        "subnetwork": ("dataflow.v1b3", _DF_ENV, "subnetwork"),
        "tempLocation": ("dataflow.v1b3", _DF_ENV, "tempLocation"),
        "stagingLocation": ("dataflow.v1b3", _DF_ENV, "stagingLocation"),
        "sdkContainerImage": ("dataflow.v1b3", _DF_ENV, "sdkContainerImage"),
        "kmsKeyName": ("dataflow.v1b3", _DF_ENV, "kmsKeyName"),
        "additionalExperiments": ("dataflow.v1b3", _DF_ENV, "additionalExperiments"),
        "additionalPipelineOptions": ("dataflow.v1b3", _DF_ENV, "additionalPipelineOptions"),
        "labels": ("dataflow.v1b3", _DF_ENV, "additionalUserLabels"),
    },
    "gcp:pubsub/topic:Topic": {
        "name": ("pubsub.v1", "Topic", "name"),
        "labels": ("pubsub.v1", "Topic", "labels"),
        "kmsKeyName": ("pubsub.v1", "Topic", "kmsKeyName"),
        "messageRetentionDuration": ("pubsub.v1", "Topic", "messageRetentionDuration"),
    },
    "gcp:pubsub/subscription:Subscription": {
        "name": ("pubsub.v1", "Subscription", "name"),
        "topic": ("pubsub.v1", "Subscription", "topic"),
        "labels": ("pubsub.v1", "Subscription", "labels"),
        "ackDeadlineSeconds": ("pubsub.v1", "Subscription", "ackDeadlineSeconds"),
        "messageRetentionDuration": ("pubsub.v1", "Subscription", "messageRetentionDuration"),
        "retainAckedMessages": ("pubsub.v1", "Subscription", "retainAckedMessages"),
        "enableExactlyOnceDelivery": ("pubsub.v1", "Subscription", "enableExactlyOnceDelivery"),
        "enableMessageOrdering": ("pubsub.v1", "Subscription", "enableMessageOrdering"),
        "filter": ("pubsub.v1", "Subscription", "filter"),
        "expirationPolicy.ttl": ("pubsub.v1", "Subscription", "expirationPolicy.ttl"),
        "deadLetterPolicy.deadLetterTopic": ("pubsub.v1", "Subscription", "deadLetterPolicy.deadLetterTopic"),
        "deadLetterPolicy.maxDeliveryAttempts": ("pubsub.v1", "Subscription", "deadLetterPolicy.maxDeliveryAttempts"),
        "retryPolicy.minimumBackoff": ("pubsub.v1", "Subscription", "retryPolicy.minimumBackoff"),
        "retryPolicy.maximumBackoff": ("pubsub.v1", "Subscription", "retryPolicy.maximumBackoff"),
        "pushConfig.pushEndpoint": ("pubsub.v1", "Subscription", "pushConfig.pushEndpoint"),
        "bigqueryConfig.table": ("pubsub.v1", "Subscription", "bigqueryConfig.table"),
        "bigqueryConfig.useTopicSchema": ("pubsub.v1", "Subscription", "bigqueryConfig.useTopicSchema"),
        "bigqueryConfig.useTableSchema": ("pubsub.v1", "Subscription", "bigqueryConfig.useTableSchema"),
        "bigqueryConfig.writeMetadata": ("pubsub.v1", "Subscription", "bigqueryConfig.writeMetadata"),
        "bigqueryConfig.dropUnknownFields": ("pubsub.v1", "Subscription", "bigqueryConfig.dropUnknownFields"),
        "bigqueryConfig.serviceAccountEmail": ("pubsub.v1", "Subscription", "bigqueryConfig.serviceAccountEmail"),
    },
    "gcp:pubsub/topicIAMMember:TopicIAMMember": _iam("pubsub.v1"),
    "gcp:pubsub/subscriptionIAMMember:SubscriptionIAMMember": _iam("pubsub.v1"),
    "gcp:bigquery/dataset:Dataset": {
        "datasetId": ("bigquery.v2", "Dataset", "datasetReference.datasetId"),
        "location": ("bigquery.v2", "Dataset", "location"),
        "description": ("bigquery.v2", "Dataset", "description"),
        "friendlyName": ("bigquery.v2", "Dataset", "friendlyName"),
        "labels": ("bigquery.v2", "Dataset", "labels"),
        "defaultTableExpirationMs": ("bigquery.v2", "Dataset", "defaultTableExpirationMs"),
        "defaultPartitionExpirationMs": ("bigquery.v2", "Dataset", "defaultPartitionExpirationMs"),
        "maxTimeTravelHours": ("bigquery.v2", "Dataset", "maxTimeTravelHours"),
        "defaultEncryptionConfiguration.kmsKeyName": (
            "bigquery.v2", "Dataset", "defaultEncryptionConfiguration.kmsKeyName"),
    },
    "gcp:bigquery/table:Table": {
        "datasetId": ("bigquery.v2", "Table", "tableReference.datasetId"),
        "tableId": ("bigquery.v2", "Table", "tableReference.tableId"),
        "description": ("bigquery.v2", "Table", "description"),
        "labels": ("bigquery.v2", "Table", "labels"),
        "schema": ("bigquery.v2", "Table", "schema.fields"),  # a JSON document: checked field by field
        "clusterings": ("bigquery.v2", "Table", "clustering.fields"),
        "timePartitioning.type": ("bigquery.v2", "Table", "timePartitioning.type"),
        "timePartitioning.field": ("bigquery.v2", "Table", "timePartitioning.field"),
        "timePartitioning.expirationMs": ("bigquery.v2", "Table", "timePartitioning.expirationMs"),
        "view.query": ("bigquery.v2", "Table", "view.query"),
        "view.useLegacySql": ("bigquery.v2", "Table", "view.useLegacySql"),
    },
    "gcp:bigquery/job:Job": {
        "jobId": ("bigquery.v2", "Job", "jobReference.jobId"),
        "location": ("bigquery.v2", "Job", "jobReference.location"),
        "labels": ("bigquery.v2", "Job", "configuration.labels"),
        "jobTimeoutMs": ("bigquery.v2", "Job", "configuration.jobTimeoutMs"),
        "query.query": ("bigquery.v2", "Job", "configuration.query.query"),
        "query.useLegacySql": ("bigquery.v2", "Job", "configuration.query.useLegacySql"),
        "query.createDisposition": ("bigquery.v2", "Job", "configuration.query.createDisposition"),
        "query.writeDisposition": ("bigquery.v2", "Job", "configuration.query.writeDisposition"),
        "extract.destinationUris": ("bigquery.v2", "Job", "configuration.extract.destinationUris"),
        "extract.destinationFormat": ("bigquery.v2", "Job", "configuration.extract.destinationFormat"),
        "extract.compression": ("bigquery.v2", "Job", "configuration.extract.compression"),
        "extract.sourceModel.projectId": ("bigquery.v2", "Job", "configuration.extract.sourceModel.projectId"),
        "extract.sourceModel.datasetId": ("bigquery.v2", "Job", "configuration.extract.sourceModel.datasetId"),
        "extract.sourceModel.modelId": ("bigquery.v2", "Job", "configuration.extract.sourceModel.modelId"),
    },
    "gcp:bigquery/iamMember:IamMember": _iam("bigquery.v2"),
    # The provider turns the binding into an entry of the dataset's access list (role and member as given).
    "gcp:bigquery/datasetIamMember:DatasetIamMember": _iam("bigquery.v2"),
    "gcp:bigtable/instance:Instance": {
        "name": ("bigtableadmin.v2", "CreateInstanceRequest", "instanceId"),
        "displayName": ("bigtableadmin.v2", "Instance", "displayName"),
        "labels": ("bigtableadmin.v2", "Instance", "labels"),
        "clusters[].clusterId": ("bigtableadmin.v2", "CreateClusterRequest", "clusterId"),
        "clusters[].storageType": ("bigtableadmin.v2", "Cluster", "defaultStorageType"),
        "clusters[].numNodes": ("bigtableadmin.v2", "Cluster", "serveNodes"),
        "clusters[].kmsKeyName": ("bigtableadmin.v2", "Cluster", "encryptionConfig.kmsKeyName"),
        "clusters[].autoscalingConfig.minNodes": (
            "bigtableadmin.v2", "Cluster", "clusterConfig.clusterAutoscalingConfig.autoscalingLimits.minServeNodes"),
        "clusters[].autoscalingConfig.maxNodes": (
            "bigtableadmin.v2", "Cluster", "clusterConfig.clusterAutoscalingConfig.autoscalingLimits.maxServeNodes"),
        "clusters[].autoscalingConfig.cpuTarget": (
            "bigtableadmin.v2", "Cluster",
            "clusterConfig.clusterAutoscalingConfig.autoscalingTargets.cpuUtilizationPercent"),
        "clusters[].autoscalingConfig.storageTarget": (
            "bigtableadmin.v2", "Cluster",
            "clusterConfig.clusterAutoscalingConfig.autoscalingTargets.storageUtilizationGibPerNode"),
    },
    "gcp:bigtable/table:Table": {
        "name": ("bigtableadmin.v2", "CreateTableRequest", "tableId"),
    },
    "gcp:bigtable/tableIamMember:TableIamMember": _iam("bigtableadmin.v2"),
    "gcp:cloudfunctionsv2/function:Function": {
        "name": ("cloudfunctions.v2", "method:projects.locations.functions.create", "functionId"),
        "description": ("cloudfunctions.v2", "Function", "description"),
        "labels": ("cloudfunctions.v2", "Function", "labels"),
        "buildConfig.runtime": ("cloudfunctions.v2", "Function", "buildConfig.runtime"),
        "buildConfig.entryPoint": ("cloudfunctions.v2", "Function", "buildConfig.entryPoint"),
        "buildConfig.serviceAccount": ("cloudfunctions.v2", "Function", "buildConfig.serviceAccount"),
        "buildConfig.environmentVariables": ("cloudfunctions.v2", "Function", "buildConfig.environmentVariables"),
        "buildConfig.source.storageSource.bucket": (
            "cloudfunctions.v2", "Function", "buildConfig.source.storageSource.bucket"),
        "buildConfig.source.storageSource.object": (
            "cloudfunctions.v2", "Function", "buildConfig.source.storageSource.object"),
        "serviceConfig.availableMemory": ("cloudfunctions.v2", "Function", "serviceConfig.availableMemory"),
        "serviceConfig.availableCpu": ("cloudfunctions.v2", "Function", "serviceConfig.availableCpu"),
        "serviceConfig.timeoutSeconds": ("cloudfunctions.v2", "Function", "serviceConfig.timeoutSeconds"),
        "serviceConfig.minInstanceCount": ("cloudfunctions.v2", "Function", "serviceConfig.minInstanceCount"),
        "serviceConfig.maxInstanceCount": ("cloudfunctions.v2", "Function", "serviceConfig.maxInstanceCount"),
        "serviceConfig.maxInstanceRequestConcurrency": (
            "cloudfunctions.v2", "Function", "serviceConfig.maxInstanceRequestConcurrency"),
        "serviceConfig.ingressSettings": ("cloudfunctions.v2", "Function", "serviceConfig.ingressSettings"),
        "serviceConfig.allTrafficOnLatestRevision": (
            "cloudfunctions.v2", "Function", "serviceConfig.allTrafficOnLatestRevision"),
        "serviceConfig.serviceAccountEmail": ("cloudfunctions.v2", "Function", "serviceConfig.serviceAccountEmail"),
        "serviceConfig.environmentVariables": (
            "cloudfunctions.v2", "Function", "serviceConfig.environmentVariables"),
        "serviceConfig.vpcConnectorEgressSettings": (
            "cloudfunctions.v2", "Function", "serviceConfig.vpcConnectorEgressSettings"),
        "eventTrigger.triggerRegion": ("cloudfunctions.v2", "Function", "eventTrigger.triggerRegion"),
        "eventTrigger.eventType": ("cloudfunctions.v2", "Function", "eventTrigger.eventType"),
        "eventTrigger.pubsubTopic": ("cloudfunctions.v2", "Function", "eventTrigger.pubsubTopic"),
        "eventTrigger.retryPolicy": ("cloudfunctions.v2", "Function", "eventTrigger.retryPolicy"),
        "eventTrigger.serviceAccountEmail": ("cloudfunctions.v2", "Function", "eventTrigger.serviceAccountEmail"),
    },
    "gcp:cloudrunv2/serviceIamMember:ServiceIamMember": _iam("run.v2", "GoogleIamV1Binding"),
    "gcp:cloudrunv2/service:Service": {
        "name": ("run.v2", "method:projects.locations.services.create", "serviceId"),
        **{path: ("run.v2", _RUN, path) for path in (
            "description", "labels", "ingress", "invokerIamDisabled", "template.serviceAccount", "template.labels",
            "template.timeout", "template.maxInstanceRequestConcurrency", "template.scaling.minInstanceCount",
            "template.scaling.maxInstanceCount", "template.containers[].image",
            "template.containers[].resources.limits", "template.containers[].resources.cpuIdle",
            "template.containers[].resources.startupCpuBoost")},
        "template.containers[].ports.containerPort": ("run.v2", _RUN, "template.containers[].ports[].containerPort"),
        "template.containers[].envs[].name": ("run.v2", _RUN, "template.containers[].env[].name"),
        "template.containers[].envs[].value": ("run.v2", _RUN, "template.containers[].env[].value"),
        "traffics[].type": ("run.v2", _RUN, "traffic[].type"),
        "traffics[].percent": ("run.v2", _RUN, "traffic[].percent"),
    },
    "gcp:compute/address:Address": {
        "name": ("compute.v1", "Address", "name"),
        "addressType": ("compute.v1", "Address", "addressType"),
        "networkTier": ("compute.v1", "Address", "networkTier"),
        "labels": ("compute.v1", "Address", "labels"),
    },
    "gcp:compute/firewall:Firewall": {
        "name": ("compute.v1", "Firewall", "name"),
        "description": ("compute.v1", "Firewall", "description"),
        "direction": ("compute.v1", "Firewall", "direction"),
        "allows[].protocol": ("compute.v1", "Firewall", "allowed[].IPProtocol"),
        "allows[].ports": ("compute.v1", "Firewall", "allowed[].ports"),
        "sourceRanges": ("compute.v1", "Firewall", "sourceRanges"),
        "sourceTags": ("compute.v1", "Firewall", "sourceTags"),
        "targetTags": ("compute.v1", "Firewall", "targetTags"),
        "priority": ("compute.v1", "Firewall", "priority"),
    },
    "gcp:compute/forwardingRule:ForwardingRule": {
        "name": ("compute.v1", "ForwardingRule", "name"),
        "ipProtocol": ("compute.v1", "ForwardingRule", "IPProtocol"),
        "loadBalancingScheme": ("compute.v1", "ForwardingRule", "loadBalancingScheme"),
        "networkTier": ("compute.v1", "ForwardingRule", "networkTier"),
        "portRange": ("compute.v1", "ForwardingRule", "portRange"),
        "labels": ("compute.v1", "ForwardingRule", "labels"),
    },
    # Global and regional health checks share the request body.
    "gcp:compute/healthCheck:HealthCheck": _HEALTH_CHECK,
    "gcp:compute/instanceTemplate:InstanceTemplate": {
        "machineType": ("compute.v1", "InstanceTemplate", "properties.machineType"),
        "tags": ("compute.v1", "InstanceTemplate", "properties.tags.items"),
        "labels": ("compute.v1", "InstanceTemplate", "properties.labels"),
        "disks[].diskSizeGb": ("compute.v1", "InstanceTemplate", "properties.disks[].initializeParams.diskSizeGb"),
        "disks[].diskType": ("compute.v1", "InstanceTemplate", "properties.disks[].initializeParams.diskType"),
        "disks[].sourceImage": ("compute.v1", "InstanceTemplate", "properties.disks[].initializeParams.sourceImage"),
        "disks[].autoDelete": ("compute.v1", "InstanceTemplate", "properties.disks[].autoDelete"),
        "disks[].boot": ("compute.v1", "InstanceTemplate", "properties.disks[].boot"),
        "shieldedInstanceConfig.enableSecureBoot": (
            "compute.v1", "InstanceTemplate", "properties.shieldedInstanceConfig.enableSecureBoot"),
        "shieldedInstanceConfig.enableVtpm": (
            "compute.v1", "InstanceTemplate", "properties.shieldedInstanceConfig.enableVtpm"),
        "shieldedInstanceConfig.enableIntegrityMonitoring": (
            "compute.v1", "InstanceTemplate", "properties.shieldedInstanceConfig.enableIntegrityMonitoring"),
        "serviceAccount.email": ("compute.v1", "InstanceTemplate", "properties.serviceAccounts[].email"),
        "serviceAccount.scopes": ("compute.v1", "InstanceTemplate", "properties.serviceAccounts[].scopes"),
    },
    "gcp:compute/network:Network": {
        "name": ("compute.v1", "Network", "name"),
        "description": ("compute.v1", "Network", "description"),
        "autoCreateSubnetworks": ("compute.v1", "Network", "autoCreateSubnetworks"),
        "routingMode": ("compute.v1", "Network", "routingConfig.routingMode"),
    },
    "gcp:compute/regionBackendService:RegionBackendService": {
        "name": ("compute.v1", "BackendService", "name"),
        "protocol": ("compute.v1", "BackendService", "protocol"),
        "loadBalancingScheme": ("compute.v1", "BackendService", "loadBalancingScheme"),
        "backends[].balancingMode": ("compute.v1", "BackendService", "backends[].balancingMode"),
        "connectionDrainingTimeoutSec": ("compute.v1", "BackendService", "connectionDraining.drainingTimeoutSec"),
    },
    "gcp:compute/regionHealthCheck:RegionHealthCheck": _HEALTH_CHECK,
    "gcp:compute/regionInstanceGroupManager:RegionInstanceGroupManager": {
        "name": ("compute.v1", "InstanceGroupManager", "name"),
        "baseInstanceName": ("compute.v1", "InstanceGroupManager", "baseInstanceName"),
        "targetSize": ("compute.v1", "InstanceGroupManager", "targetSize"),
        "versions[].name": ("compute.v1", "InstanceGroupManager", "versions[].name"),
        "namedPorts[].name": ("compute.v1", "InstanceGroupManager", "namedPorts[].name"),
        "namedPorts[].port": ("compute.v1", "InstanceGroupManager", "namedPorts[].port"),
        "autoHealingPolicies.initialDelaySec": (
            "compute.v1", "InstanceGroupManager", "autoHealingPolicies[].initialDelaySec"),
        "updatePolicy.type": ("compute.v1", "InstanceGroupManager", "updatePolicy.type"),
        "updatePolicy.minimalAction": ("compute.v1", "InstanceGroupManager", "updatePolicy.minimalAction"),
        "updatePolicy.maxSurgeFixed": ("compute.v1", "InstanceGroupManager", "updatePolicy.maxSurge.fixed"),
        "updatePolicy.maxUnavailableFixed": (
            "compute.v1", "InstanceGroupManager", "updatePolicy.maxUnavailable.fixed"),
        "updatePolicy.mostDisruptiveAllowedAction": (
            "compute.v1", "InstanceGroupManager", "updatePolicy.mostDisruptiveAllowedAction"),
        "updatePolicy.replacementMethod": ("compute.v1", "InstanceGroupManager", "updatePolicy.replacementMethod"),
        "updatePolicy.instanceRedistributionType": (
            "compute.v1", "InstanceGroupManager", "updatePolicy.instanceRedistributionType"),
    },
    "gcp:compute/regionAutoscaler:RegionAutoscaler": {
        "name": ("compute.v1", "Autoscaler", "name"),
        "autoscalingPolicy.minReplicas": ("compute.v1", "Autoscaler", "autoscalingPolicy.minNumReplicas"),
        "autoscalingPolicy.maxReplicas": ("compute.v1", "Autoscaler", "autoscalingPolicy.maxNumReplicas"),
        "autoscalingPolicy.mode": ("compute.v1", "Autoscaler", "autoscalingPolicy.mode"),
        "autoscalingPolicy.cooldownPeriod": ("compute.v1", "Autoscaler", "autoscalingPolicy.coolDownPeriodSec"),
        "autoscalingPolicy.metrics[].name": (
            "compute.v1", "Autoscaler", "autoscalingPolicy.customMetricUtilizations[].metric"),
        "autoscalingPolicy.metrics[].target": (
            "compute.v1", "Autoscaler", "autoscalingPolicy.customMetricUtilizations[].utilizationTarget"),
        "autoscalingPolicy.metrics[].type": (
            "compute.v1", "Autoscaler", "autoscalingPolicy.customMetricUtilizations[].utilizationTargetType"),
        "autoscalingPolicy.cpuUtilization.target": (
            "compute.v1", "Autoscaler", "autoscalingPolicy.cpuUtilization.utilizationTarget"),
        "autoscalingPolicy.scaleInControl.maxScaledInReplicas.fixed": (
            "compute.v1", "Autoscaler", "autoscalingPolicy.scaleInControl.maxScaledInReplicas.fixed"),
        "autoscalingPolicy.scaleInControl.timeWindowSec": (
            "compute.v1", "Autoscaler", "autoscalingPolicy.scaleInControl.timeWindowSec"),
    },
    "gcp:compute/router:Router": {
        "name": ("compute.v1", "Router", "name"),
    },
    "gcp:compute/routerNat:RouterNat": {
        "name": ("compute.v1", "Router", "nats[].name"),
        "natIpAllocateOption": ("compute.v1", "Router", "nats[].natIpAllocateOption"),
        "sourceSubnetworkIpRangesToNat": ("compute.v1", "Router", "nats[].sourceSubnetworkIpRangesToNat"),
    },
    "gcp:compute/subnetwork:Subnetwork": {
        "name": ("compute.v1", "Subnetwork", "name"),
        "ipCidrRange": ("compute.v1", "Subnetwork", "ipCidrRange"),
        "privateIpGoogleAccess": ("compute.v1", "Subnetwork", "privateIpGoogleAccess"),
        "logConfig.aggregationInterval": ("compute.v1", "Subnetwork", "logConfig.aggregationInterval"),
        "logConfig.flowSampling": ("compute.v1", "Subnetwork", "logConfig.flowSampling"),
        "logConfig.metadata": ("compute.v1", "Subnetwork", "logConfig.metadata"),
    },
    "gcp:firestore/database:Database": {
        "name": ("firestore.v1", "method:projects.databases.create", "databaseId"),
        "type": ("firestore.v1", "GoogleFirestoreAdminV1Database", "type"),
        "locationId": ("firestore.v1", "GoogleFirestoreAdminV1Database", "locationId"),
        "concurrencyMode": ("firestore.v1", "GoogleFirestoreAdminV1Database", "concurrencyMode"),
        "deleteProtectionState": ("firestore.v1", "GoogleFirestoreAdminV1Database", "deleteProtectionState"),
    },
    "gcp:monitoring/alertPolicy:AlertPolicy": {
        "displayName": (_MON, "AlertPolicy", "displayName"),
        "combiner": (_MON, "AlertPolicy", "combiner"),
        "severity": (_MON, "AlertPolicy", "severity"),
        "userLabels": (_MON, "AlertPolicy", "userLabels"),
        "notificationChannels": (_MON, "AlertPolicy", "notificationChannels"),
        "documentation.content": (_MON, "AlertPolicy", "documentation.content"),
        "documentation.mimeType": (_MON, "AlertPolicy", "documentation.mimeType"),
        "documentation.subject": (_MON, "AlertPolicy", "documentation.subject"),
        "alertStrategy.autoClose": (_MON, "AlertPolicy", "alertStrategy.autoClose"),
        "conditions[].displayName": (_MON, _COND, "displayName"),
        "conditions[].conditionThreshold.filter": (_MON, _COND, "conditionThreshold.filter"),
        "conditions[].conditionThreshold.comparison": (_MON, _COND, "conditionThreshold.comparison"),
        "conditions[].conditionThreshold.thresholdValue": (_MON, _COND, "conditionThreshold.thresholdValue"),
        "conditions[].conditionThreshold.duration": (_MON, _COND, "conditionThreshold.duration"),
        "conditions[].conditionThreshold.evaluationMissingData": (
            _MON, _COND, "conditionThreshold.evaluationMissingData"),
        "conditions[].conditionThreshold.trigger.count": (_MON, _COND, "conditionThreshold.trigger.count"),
        "conditions[].conditionThreshold.aggregations[].alignmentPeriod": (
            _MON, _COND, "conditionThreshold.aggregations[].alignmentPeriod"),
        "conditions[].conditionThreshold.aggregations[].perSeriesAligner": (
            _MON, _COND, "conditionThreshold.aggregations[].perSeriesAligner"),
        "conditions[].conditionThreshold.aggregations[].crossSeriesReducer": (
            _MON, _COND, "conditionThreshold.aggregations[].crossSeriesReducer"),
        "conditions[].conditionThreshold.aggregations[].groupByFields": (
            _MON, _COND, "conditionThreshold.aggregations[].groupByFields"),
        "conditions[].conditionAbsent.filter": (_MON, _COND, "conditionAbsent.filter"),
        "conditions[].conditionAbsent.duration": (_MON, _COND, "conditionAbsent.duration"),
        "conditions[].conditionAbsent.trigger.count": (_MON, _COND, "conditionAbsent.trigger.count"),
        "conditions[].conditionAbsent.aggregations[].alignmentPeriod": (
            _MON, _COND, "conditionAbsent.aggregations[].alignmentPeriod"),
        "conditions[].conditionAbsent.aggregations[].perSeriesAligner": (
            _MON, _COND, "conditionAbsent.aggregations[].perSeriesAligner"),
        "conditions[].conditionAbsent.aggregations[].crossSeriesReducer": (
            _MON, _COND, "conditionAbsent.aggregations[].crossSeriesReducer"),
        "conditions[].conditionAbsent.aggregations[].groupByFields": (
            _MON, _COND, "conditionAbsent.aggregations[].groupByFields"),
    },
    "gcp:monitoring/dashboard:Dashboard": {
        "dashboardJson": ("monitoring.v1", "Dashboard", ""),  # a JSON document: checked field by field
    },
    "gcp:monitoring/metricDescriptor:MetricDescriptor": {
        "type": (_MON, "MetricDescriptor", "type"),
        "metricKind": (_MON, "MetricDescriptor", "metricKind"),
        "valueType": (_MON, "MetricDescriptor", "valueType"),
        "unit": (_MON, "MetricDescriptor", "unit"),
        "displayName": (_MON, "MetricDescriptor", "displayName"),
        "description": (_MON, "MetricDescriptor", "description"),
        "labels[].key": (_MON, "MetricDescriptor", "labels[].key"),
        "labels[].valueType": (_MON, "MetricDescriptor", "labels[].valueType"),
        "labels[].description": (_MON, "MetricDescriptor", "labels[].description"),
    },
    "gcp:monitoring/notificationChannel:NotificationChannel": {
        "type": (_MON, "NotificationChannel", "type"),
        "displayName": (_MON, "NotificationChannel", "displayName"),
        "labels": (_MON, "NotificationChannel", "labels"),
        "userLabels": (_MON, "NotificationChannel", "userLabels"),
    },
    "gcp:monitoring/uptimeCheckConfig:UptimeCheckConfig": {
        "displayName": (_MON, "UptimeCheckConfig", "displayName"),
        "period": (_MON, "UptimeCheckConfig", "period"),
        "timeout": (_MON, "UptimeCheckConfig", "timeout"),
        "userLabels": (_MON, "UptimeCheckConfig", "userLabels"),
        "tcpCheck.port": (_MON, "UptimeCheckConfig", "tcpCheck.port"),
        "monitoredResource.type": (_MON, "UptimeCheckConfig", "monitoredResource.type"),
        "monitoredResource.labels": (_MON, "UptimeCheckConfig", "monitoredResource.labels"),
    },
    "gcp:projects/iAMMember:IAMMember": _iam(
        "cloudresourcemanager.v1",
        **{"condition.expression": ("cloudresourcemanager.v1", "Binding", "condition.expression"),
           "condition.title": ("cloudresourcemanager.v1", "Binding", "condition.title"),
           "condition.description": ("cloudresourcemanager.v1", "Binding", "condition.description")}),
    "gcp:projects/iAMCustomRole:IAMCustomRole": {
        "roleId": ("iam.v1", "CreateRoleRequest", "roleId"),
        "title": ("iam.v1", "CreateRoleRequest", "role.title"),
        "description": ("iam.v1", "CreateRoleRequest", "role.description"),
        "permissions": ("iam.v1", "CreateRoleRequest", "role.includedPermissions"),
        "stage": ("iam.v1", "CreateRoleRequest", "role.stage"),
    },
    "gcp:projects/service:Service": {
        "service": ("serviceusage.v1", "GoogleApiServiceusageV1Service", "name"),
    },
    "gcp:projects/serviceIdentity:ServiceIdentity": {
        "service": ("serviceusage.v1", "GoogleApiServiceusageV1Service", "name"),
    },
    "gcp:secretmanager/secret:Secret": {
        "secretId": ("secretmanager.v1", "method:projects.secrets.create", "secretId"),
        "labels": ("secretmanager.v1", "Secret", "labels"),
        "replication.auto": ("secretmanager.v1", "Secret", "replication.automatic"),
        "ttl": ("secretmanager.v1", "Secret", "ttl"),
    },
    "gcp:secretmanager/secretIamMember:SecretIamMember": _iam("secretmanager.v1"),
    "gcp:serviceaccount/account:Account": {
        "accountId": ("iam.v1", "CreateServiceAccountRequest", "accountId"),
        "displayName": ("iam.v1", "CreateServiceAccountRequest", "serviceAccount.displayName"),
        "description": ("iam.v1", "CreateServiceAccountRequest", "serviceAccount.description"),
    },
    "gcp:serviceaccount/iAMMember:IAMMember": _iam("iam.v1"),
    "gcp:storage/bucket:Bucket": {
        "name": ("storage.v1", "Bucket", "name"),
        "location": ("storage.v1", "Bucket", "location"),
        "labels": ("storage.v1", "Bucket", "labels"),
        "uniformBucketLevelAccess": ("storage.v1", "Bucket", "iamConfiguration.uniformBucketLevelAccess.enabled"),
        "publicAccessPrevention": ("storage.v1", "Bucket", "iamConfiguration.publicAccessPrevention"),
        "versioning.enabled": ("storage.v1", "Bucket", "versioning.enabled"),
        "encryption.defaultKmsKeyName": ("storage.v1", "Bucket", "encryption.defaultKmsKeyName"),
        "lifecycleRules[].action.type": ("storage.v1", "Bucket", "lifecycle.rule[].action.type"),
        "lifecycleRules[].condition.age": ("storage.v1", "Bucket", "lifecycle.rule[].condition.age"),
        "lifecycleRules[].condition.matchesPrefixes": (
            "storage.v1", "Bucket", "lifecycle.rule[].condition.matchesPrefix"),
    },
    "gcp:storage/bucketIAMMember:BucketIAMMember": _iam("storage.v1", "Policy", "bindings[].",
                                                        bucket=("storage.v1", "Bucket", "name")),
    "gcp:storage/bucketObject:BucketObject": {
        "name": ("storage.v1", "Object", "name"),
        "bucket": ("storage.v1", "Object", "bucket"),
        "contentType": ("storage.v1", "Object", "contentType"),
    },
    "gcp:artifactregistry/repository:Repository": {
        "repositoryId": ("artifactregistry.v1", "method:projects.locations.repositories.create", "repositoryId"),
        "format": ("artifactregistry.v1", "Repository", "format"),
        "mode": ("artifactregistry.v1", "Repository", "mode"),
        "description": ("artifactregistry.v1", "Repository", "description"),
        "labels": ("artifactregistry.v1", "Repository", "labels"),
        "kmsKeyName": ("artifactregistry.v1", "Repository", "kmsKeyName"),
    },
    "gcp:artifactregistry/repositoryIamMember:RepositoryIamMember": _iam("artifactregistry.v1"),
    "gcp:kms/cryptoKeyIAMMember:CryptoKeyIAMMember": _iam("cloudkms.v1"),
    "gcp:workbench/instance:Instance": {
        "name": ("notebooks.v2", "method:projects.locations.instances.create", "instanceId"),
        "labels": ("notebooks.v2", "Instance", "labels"),
        "disableProxyAccess": ("notebooks.v2", "Instance", "disableProxyAccess"),
        "enableDeletionProtection": ("notebooks.v2", "Instance", "enableDeletionProtection"),
        "gceSetup.machineType": ("notebooks.v2", "Instance", "gceSetup.machineType"),
        "gceSetup.disablePublicIp": ("notebooks.v2", "Instance", "gceSetup.disablePublicIp"),
        "gceSetup.metadata": ("notebooks.v2", "Instance", "gceSetup.metadata"),
        "gceSetup.networkInterfaces[].network": ("notebooks.v2", "Instance", "gceSetup.networkInterfaces[].network"),
        "gceSetup.networkInterfaces[].subnet": ("notebooks.v2", "Instance", "gceSetup.networkInterfaces[].subnet"),
        "gceSetup.serviceAccounts[].email": ("notebooks.v2", "Instance", "gceSetup.serviceAccounts[].email"),
        "gceSetup.dataDisks.diskSizeGb": ("notebooks.v2", "Instance", "gceSetup.dataDisks[].diskSizeGb"),
        "gceSetup.dataDisks.diskType": ("notebooks.v2", "Instance", "gceSetup.dataDisks[].diskType"),
        "gceSetup.bootDisk.diskSizeGb": ("notebooks.v2", "Instance", "gceSetup.bootDisk.diskSizeGb"),
        "gceSetup.bootDisk.diskType": ("notebooks.v2", "Instance", "gceSetup.bootDisk.diskType"),
        "gceSetup.shieldedInstanceConfig.enableSecureBoot": (
            "notebooks.v2", "Instance", "gceSetup.shieldedInstanceConfig.enableSecureBoot"),
        "gceSetup.shieldedInstanceConfig.enableVtpm": (
            "notebooks.v2", "Instance", "gceSetup.shieldedInstanceConfig.enableVtpm"),
        "gceSetup.shieldedInstanceConfig.enableIntegrityMonitoring": (
            "notebooks.v2", "Instance", "gceSetup.shieldedInstanceConfig.enableIntegrityMonitoring"),
    },
}

# Inputs of mapped types that are not a field of the request body, and why. An input in none of MAPPING, these
# two tables is a test failure: it has to be held against the API or be said to need no check.
PROVIDER_INPUTS: dict[str, str] = {
    "project": "the project segment of the request URL",
    "region": "the region segment of the request URL",
    "location": "the location segment of the request URL",
    "deletionProtection": "the provider's own guard against destroy (Bigtable and BigQuery tables and instances, "
                          "Secret Manager); only Bigtable's table variant reaches an API field, as a boolean",
    "forceDestroy": "the provider's own switch: delete a bucket's objects before the bucket",
    "deleteContentsOnDestroy": "the provider's own switch: delete a dataset's tables with it",
    "deletionPolicy": "the provider's own switch: what destroy does (delete, abandon or refuse)",
}
UNMAPPED_INPUTS: dict[str, dict[str, str]] = {
    "gcp:dataflow/flexTemplateJob:FlexTemplateJob": {
        "onDelete": "what the provider calls at destroy (cancel or drain): a jobs.update of the job's state",
        "skipWaitOnJobTermination": "the provider's own wait at destroy; no request carries it",
    },
    "gcp:projects/service:Service": {
        "disableOnDestroy": "the provider's own switch at destroy", "disableDependentServices": "the same"},
    "gcp:bigtable/table:Table": {
        "instanceName": "the parent segment of the request URL",
        "columnFamilies": "map keys of Table.columnFamilies (family ids), each with an empty GC rule here",
    },
    "gcp:compute/instanceTemplate:InstanceTemplate": {
        "namePrefix": "the provider appends a unique suffix and limits the prefix itself (37 characters)",
        "metadata": "free key/value pairs (properties.metadata.items); no schema constraint",
        "metadataStartupScript": "the metadata item startup-script; no schema constraint",
        "networkInterfaces": "network and subnetwork references the provider expands to self-links",
    },
    "gcp:compute/regionInstanceGroupManager:RegionInstanceGroupManager": {
        "waitForInstances": "the provider's own wait after the request"},
    "gcp:compute/regionAutoscaler:RegionAutoscaler": {"target": "a reference to the group, a self-link"},
    "gcp:compute/forwardingRule:ForwardingRule": {
        "backendService": "a reference the provider expands to a self-link", "ipAddress": "an address it created"},
    "gcp:compute/regionBackendService:RegionBackendService": {
        "healthChecks": "a reference the provider expands to a self-link"},
    "gcp:compute/firewall:Firewall": {"network": "a reference the provider expands to a self-link"},
    "gcp:compute/subnetwork:Subnetwork": {"network": "a reference the provider expands to a self-link"},
    "gcp:compute/router:Router": {"network": "a reference the provider expands to a self-link"},
    "gcp:compute/routerNat:RouterNat": {"router": "the router whose nats[] the provider patches"},
    "gcp:storage/bucketObject:BucketObject": {
        "content": "the object's bytes (a media upload, not a field)", "source": "the same, from a file or archive"},
    "gcp:cloudrunv2/serviceIamMember:ServiceIamMember": {"name": "the service segment of the request URL"},
}
# IAM member resources name their parent in the request URL.
for _rtype, _parent in {
        "gcp:pubsub/topicIAMMember:TopicIAMMember": ("topic",),
        "gcp:pubsub/subscriptionIAMMember:SubscriptionIAMMember": ("subscription",),
        "gcp:bigquery/iamMember:IamMember": ("datasetId", "tableId"),
        "gcp:bigquery/datasetIamMember:DatasetIamMember": ("datasetId",),
        "gcp:bigtable/tableIamMember:TableIamMember": ("instanceName", "table"),
        "gcp:artifactregistry/repositoryIamMember:RepositoryIamMember": ("repository",),
        "gcp:secretmanager/secretIamMember:SecretIamMember": ("secretId",),
        "gcp:serviceaccount/iAMMember:IAMMember": ("serviceAccountId",),
        "gcp:kms/cryptoKeyIAMMember:CryptoKeyIAMMember": ("cryptoKeyId",)}.items():
    UNMAPPED_INPUTS.setdefault(_rtype, {}).update({k: "the parent segment of the request URL" for k in _parent})


def unaccounted_inputs(rtype: str, inputs: Mapping[str, Any]) -> list[str]:
    """Top-level inputs of a mapped resource that neither the mapping nor the two tables above account for."""
    mapped = {path.split(".")[0].removesuffix("[]") for path in MAPPING.get(rtype, {})}
    known = mapped | set(PROVIDER_INPUTS) | set(UNMAPPED_INPUTS.get(rtype, {}))
    return sorted(k for k in inputs if k not in known)


NOT_COVERED: dict[str, str] = {
    "gcp:bigtable/gCPolicy:GCPolicy":
        "the provider takes a Go duration (e.g. 8760h) and converts it into GcRule.maxAge seconds itself; its own "
        "schema validates the Go form, so the API field never sees the input as written",
    "gcp:firestore/field:Field":
        "inputs are a collection and field path and an empty ttlConfig (a presence flag): no enum, pattern or "
        "documented limit applies",
    "gcp:secretmanager/secretVersion:SecretVersion":
        "secret_data is base64-encoded by the provider into SecretPayload.data; the PEM text has no schema constraint",
    "docker-build:index:Image": "not a GCP API call: a Docker build and push to the registry",
    "tls:index/privateKey:PrivateKey": "not a GCP API call: key material made by the TLS provider locally",
    "tls:index/selfSignedCert:SelfSignedCert": "not a GCP API call: made by the TLS provider locally",
    "tls:index/certRequest:CertRequest": "not a GCP API call: made by the TLS provider locally",
    "time:index/sleep:Sleep": "not a GCP API call: a wait the time provider keeps locally, for what GCP propagates",
    "tls:index/locallySignedCert:LocallySignedCert": "not a GCP API call: made by the TLS provider locally",
    "random:index/randomPassword:RandomPassword": "not a GCP API call: made by the random provider locally",
}


# ---------------------------------------------------------------------------------------------- limits


@dataclass(frozen=True)
class Limit:
    """A documented constraint on one API field. ``quote`` is a sentence of the field's description (or of
    ``quoted_from``'s) that states it; ``source`` states the rule in this file's words when the discovery
    document only points elsewhere for it."""

    quote: str | None = None
    source: str | None = None
    quoted_from: Target | None = None
    minimum: float | None = None  # numbers, or seconds for a google-duration
    maximum: float | None = None
    choices: tuple[str, ...] = ()
    regex: str | None = None  # the whole value, or its last path segment when ``last_segment``
    last_segment: bool = False
    labels: bool = False  # a map of GCP labels


# Labels on every GCP resource: keys 1-63 characters, lowercase letter first, lowercase letters, digits, _ and -;
# values 0-63 of the same characters.
LABEL_KEY = r"[a-z][a-z0-9_-]{0,62}"
LABEL_VALUE = r"[a-z0-9_-]{0,63}"
_LABELS = Limit(labels=True, source="GCP labels: keys 1-63 characters, a lowercase letter first, then lowercase "
                "letters, digits, _ and -; values 0-63 of the same")
# Pub/Sub topic and subscription ids.
_PUBSUB_ID = Limit(quote="must start with a letter, and contain only letters", last_segment=True,
                   regex=r"(?!goog)[A-Za-z][A-Za-z0-9\-_.~+%]{2,254}")
_IAM_ROLE = Limit(source="a role is roles/NAME (predefined) or projects/P/roles/NAME (a project's custom role)",
                  regex=r"roles/[A-Za-z0-9_.]+|projects/[^/]+/roles/.+")
_IAM_MEMBER = Limit(quote="`serviceAccount:{emailid}`",
                    regex=r"(user|group|serviceAccount|domain):[^\s:]+|allUsers|allAuthenticatedUsers")

LIMITS: dict[Target, Limit] = {
    ("dataflow.v1b3", _DF_LAUNCH, "jobName"): Limit(
        quote="The name must match the regular expression `[a-z]([-a-z0-9]{0,1022}[a-z0-9])?`",
        quoted_from=("dataflow.v1b3", "Job", "name"), regex=r"[a-z]([-a-z0-9]{0,1022}[a-z0-9])?"),
    ("dataflow.v1b3", _DF_ENV, "additionalUserLabels"): _LABELS,
    ("pubsub.v1", "Topic", "name"): _PUBSUB_ID,
    ("pubsub.v1", "Subscription", "name"): _PUBSUB_ID,
    ("pubsub.v1", "Topic", "labels"): _LABELS,
    ("pubsub.v1", "Subscription", "labels"): _LABELS,
    ("pubsub.v1", "Topic", "messageRetentionDuration"): Limit(
        quote="Cannot be more than 31 days or less than 10 minutes.", minimum=600, maximum=31 * 86400),
    ("pubsub.v1", "Subscription", "messageRetentionDuration"): Limit(
        quote="Cannot be more than 31 days or less than 10 minutes.", minimum=600, maximum=31 * 86400),
    ("pubsub.v1", "Subscription", "ackDeadlineSeconds"): Limit(
        quote="The maximum custom deadline you can specify is 600 seconds", minimum=10, maximum=600),
    ("pubsub.v1", "Subscription", "deadLetterPolicy.maxDeliveryAttempts"): Limit(
        quote="The value must be between 5 and 100.", minimum=5, maximum=100),
    ("pubsub.v1", "Subscription", "retryPolicy.minimumBackoff"): Limit(
        quote="Value should be between 0 and 600 seconds.", minimum=0, maximum=600),
    ("pubsub.v1", "Subscription", "retryPolicy.maximumBackoff"): Limit(
        quote="Value should be between 0 and 600 seconds.", minimum=0, maximum=600),
    ("bigquery.v2", "Dataset", "datasetReference.datasetId"): Limit(
        quote="The ID must contain only letters (a-z, A-Z), numbers (0-9), or underscores (_).",
        regex=r"[A-Za-z0-9_]{1,1024}"),
    ("bigquery.v2", "Dataset", "labels"): _LABELS,
    ("bigquery.v2", "Dataset", "defaultTableExpirationMs"): Limit(
        quote="The minimum lifetime value is 3600000 milliseconds (one hour).", minimum=3_600_000),
    ("bigquery.v2", "Table", "labels"): Limit(
        quote="Label keys and values can be no longer than 63 characters", labels=True),
    ("bigquery.v2", "Table", "timePartitioning.type"): Limit(
        quote="The supported types are DAY, HOUR, MONTH, and YEAR", choices=("DAY", "HOUR", "MONTH", "YEAR")),
    ("bigquery.v2", "Job", "configuration.labels"): _LABELS,
    ("bigquery.v2", "Job", "configuration.query.createDisposition"): Limit(
        quote="CREATE_IF_NEEDED", choices=("CREATE_IF_NEEDED", "CREATE_NEVER")),
    ("bigquery.v2", "Job", "configuration.query.writeDisposition"): Limit(
        quote="WRITE_TRUNCATE", choices=("WRITE_TRUNCATE", "WRITE_TRUNCATE_DATA", "WRITE_APPEND", "WRITE_EMPTY")),
    ("bigquery.v2", "Job", "configuration.extract.destinationFormat"): Limit(
        quote="ML_TF_SAVED_MODEL or ML_XGBOOST_BOOSTER for models",
        choices=("CSV", "NEWLINE_DELIMITED_JSON", "PARQUET", "AVRO", "ML_TF_SAVED_MODEL", "ML_XGBOOST_BOOSTER")),
    ("bigquery.v2", "Job", "jobReference.jobId"): Limit(
        quote="The ID must contain only letters (a-z, A-Z), numbers (0-9), underscores (_), or dashes (-).",
        regex=r"[A-Za-z0-9_-]{1,1024}"),
    ("bigtableadmin.v2", "CreateInstanceRequest", "instanceId"): Limit(
        regex=r"[a-z][a-z0-9-]{4,31}[a-z0-9]",
        source="instance ids are 6-33 characters: lowercase letters, digits and hyphens, a letter first"),
    ("bigtableadmin.v2", "Instance", "displayName"): Limit(
        quote="Can be changed at any time, but should be kept globally unique to avoid confusion.",
        regex=r".{4,30}",
        source="display names are 4-30 characters"),
    ("bigtableadmin.v2", "Instance", "labels"): Limit(
        quote="Label keys must be between 1 and 63 characters long", labels=True),
    ("bigtableadmin.v2", "CreateClusterRequest", "clusterId"): Limit(
        regex=r"[a-z][-a-z0-9]{4,28}[a-z0-9]",
        source="cluster ids are 6-30 characters"),
    ("bigtableadmin.v2", "Cluster",
     "clusterConfig.clusterAutoscalingConfig.autoscalingTargets.cpuUtilizationPercent"): Limit(
        quote="This number is on a scale from 0 (no utilization) to 100 (total utilization), and is limited between "
              "10 and 80",
        minimum=10, maximum=80),
    ("bigtableadmin.v2", "CreateTableRequest", "tableId"): Limit(quote="Maximum 50 characters.",
                                                                 regex=r"[-_.a-zA-Z0-9]{1,50}"),
    ("iam.v1", "CreateRoleRequest", "roleId"): Limit(
        quote="It must contain a minimum of 3 characters and a maximum of 64 characters.",
        regex=r"[A-Za-z0-9_.]{3,64}"),
    ("iam.v1", "CreateRoleRequest", "role.title"): Limit(
        quote="Typically this is limited to 100 UTF-8 bytes.", quoted_from=("iam.v1", "Role", "title"),
        regex=r"[ -~]{1,100}"),
    ("cloudfunctions.v2", "Function", "labels"): _LABELS,
    ("cloudfunctions.v2", "Function", "serviceConfig.availableMemory"): Limit(
        quote="Supported units are k, M, G, Mi, Gi.", regex=r"\d+(k|M|G|Mi|Gi)?"),
    ("compute.v1", "Address", "labels"): _LABELS,
    ("run.v2", "method:projects.locations.services.create", "serviceId"): Limit(
        quote="It must begin with letter, and cannot end with hyphen; must contain fewer than 50 characters.",
        regex=r"[a-z]([-a-z0-9]{0,47}[a-z0-9])?",
        source="lowercase letters, digits and hyphens (cloud.google.com/run/docs/deploying#service)"),
    ("run.v2", _RUN, "description"): Limit(quote="This field currently has a 512-character limit.",
                                           regex=r"(?s).{0,512}", maximum=512),
    ("run.v2", _RUN, "labels"): _LABELS,
    ("run.v2", _RUN, "template.labels"): _LABELS,
    ("run.v2", _RUN, "template.containers[].ports[].containerPort"): Limit(
        quote="0 < container_port < 65536", minimum=1, maximum=65535),
    ("compute.v1", "ForwardingRule", "labels"): _LABELS,
    ("compute.v1", "InstanceTemplate", "properties.labels"): _LABELS,
    ("compute.v1", "HealthCheck", "checkIntervalSec"): Limit(
        quote="How often (in seconds) to send a health check.", minimum=1, maximum=300,
        source="a health check runs every 1-300 s"),
    ("compute.v1", "Autoscaler", "autoscalingPolicy.minNumReplicas"): Limit(
        quote="This cannot be less than 0.", minimum=0, maximum=2000,
        source="a regional managed instance group holds up to 2000 VMs (compute.v1 "
               "regionInstanceGroupManagers.insert: \"A regional managed instance group can contain up to 2000 "
               "instances.\")"),
    ("compute.v1", "Autoscaler", "autoscalingPolicy.maxNumReplicas"): Limit(
        quote="The maximum number of replicas must not be lower than minimal number of replicas.", minimum=1,
        maximum=2000, source="the same limit of a regional managed instance group: 2000 VMs"),
    ("compute.v1", "Autoscaler", "autoscalingPolicy.cpuUtilization.utilizationTarget"): Limit(
        quote="Must be a float value in the range (0, 1].", minimum=0.01, maximum=1),
    ("compute.v1", "Autoscaler", "autoscalingPolicy.customMetricUtilizations[].utilizationTarget"): Limit(
        quote="This must be a positive value.", minimum=1),
    ("compute.v1", "InstanceGroupManager", "updatePolicy.maxSurge.fixed"): Limit(
        quote="At least one of either maxSurge ormaxUnavailable must be greater than 0.", minimum=3,
        quoted_from=("compute.v1", "InstanceGroupManager", "updatePolicy.maxSurge"),
        source="a regional group refuses a fixed maxSurge other than 0 or at least its zones (3 by default): "
               "\"Fixed updatePolicy.maxUnavailable for regional managed instance group has to be either 0 or at "
               "least equal to the number of zones\", the API's own 400 for maxUnavailable, alike for maxSurge"),
    ("compute.v1", "Subnetwork", "logConfig.flowSampling"): Limit(
        quote="The value of the field must be in [0, 1].", minimum=0, maximum=1),
    ("cloudfunctions.v2", "method:projects.locations.functions.create", "functionId"): Limit(
        quote="This value should be 4-63 characters, and valid characters are /a-z-/.", regex=r"[a-z][-a-z0-9]{3,62}",
        source="digits are accepted too: Cloud Functions takes a-z, 0-9 and -, a letter first"),
    ("firestore.v1", "method:projects.databases.create", "databaseId"): Limit(
        quote="\"(default)\" database ID is also valid", regex=r"\(default\)|[a-z][a-z0-9-]{2,61}[a-z0-9]"),
    ("monitoring.v3", "AlertPolicy", "userLabels"): Limit(
        quote="Each key and value is limited to 63 Unicode characters or 128 bytes", labels=True),
    ("monitoring.v3", "AlertPolicy", "documentation.mimeType"): Limit(
        quote="text/markdown", choices=("text/markdown",)),
    ("monitoring.v3", "UptimeCheckConfig", "period"): Limit(
        quote="Currently, the only supported values are 60s (1 minute), 300s (5 minutes), 600s (10 minutes), and "
              "900s (15 minutes).",
        choices=("60s", "300s", "600s", "900s")),
    ("monitoring.v3", "UptimeCheckConfig", "timeout"): Limit(
        quote="must be between 1 and 60 seconds", minimum=1, maximum=60),
    ("monitoring.v3", "UptimeCheckConfig", "userLabels"): Limit(
        quote="Each key and value is limited to 63 Unicode characters or 128 bytes", labels=True),
    ("monitoring.v3", "NotificationChannel", "userLabels"): _LABELS,
    ("monitoring.v3", "MetricDescriptor", "type"): Limit(
        quote="All user-defined metric types have the DNS name custom.googleapis.com or external.googleapis.com.",
        regex=r"(custom|external)\.googleapis\.com/[A-Za-z0-9_/]+"),
    ("serviceusage.v1", "GoogleApiServiceusageV1Service", "name"): Limit(
        quote="projects/123/services/serviceusage.googleapis.com", regex=r"[a-z0-9-]+(\.[a-z0-9-]+)*\.googleapis\.com"),
    ("secretmanager.v1", "method:projects.secrets.create", "secretId"): Limit(
        quote="A secret ID is a string with a maximum length of 255 characters and can contain uppercase and "
              "lowercase letters, numerals, and the hyphen (`-`) and underscore (`_`) characters.",
        regex=r"[A-Za-z0-9_-]{1,255}"),
    ("secretmanager.v1", "Secret", "labels"): Limit(
        quote="Label keys must be between 1 and 63 characters long", labels=True),
    ("iam.v1", "CreateServiceAccountRequest", "accountId"): Limit(
        quote="must be 6-30 characters long", regex=r"[a-z]([-a-z0-9]*[a-z0-9])", minimum=6, maximum=30),
    ("iam.v1", "CreateServiceAccountRequest", "serviceAccount.displayName"): Limit(
        quote="The maximum length is 100 UTF-8 bytes.", regex=r".{0,100}"),
    ("storage.v1", "Bucket", "name"): Limit(
        source="3-63 characters: lowercase letters, digits, -, _ and ., starting and ending with a letter or digit",
        regex=r"[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]"),
    ("storage.v1", "Bucket", "labels"): _LABELS,
    ("storage.v1", "Bucket", "iamConfiguration.publicAccessPrevention"): Limit(
        quote="Currently, 'inherited' and 'enforced' are supported.", choices=("inherited", "enforced")),
    ("storage.v1", "Bucket", "lifecycle.rule[].action.type"): Limit(
        quote="Currently, only Delete, SetStorageClass, and AbortIncompleteMultipartUpload are supported.",
        choices=("Delete", "SetStorageClass", "AbortIncompleteMultipartUpload")),
    ("artifactregistry.v1", "Repository", "labels"): Limit(
        quote="Label keys and values may be no longer than 63 characters.", labels=True),
    ("notebooks.v2", "Instance", "labels"): _LABELS,
}
# Cloud Storage documents its bucket policy members in its own words.
_GCS_IAM_MEMBER = Limit(quote="serviceAccount:emailid - An email address that represents a service account.",
                        regex=_IAM_MEMBER.regex)
LIMITS.update({t: _IAM_ROLE if t[2].endswith("role") else _GCS_IAM_MEMBER if t[0] == "storage.v1" else _IAM_MEMBER
               for t in IAM_TARGETS})


# ------------------------------------------------------------------------------------------ documents


@cache
def document(name: str) -> dict[str, Any]:
    return json.loads((DOCUMENTS / f"{name}.json").read_text())


def _step(doc: dict[str, Any], prop: dict[str, Any]) -> dict[str, Any]:
    """A property schema with its ``$ref`` resolved."""
    while "$ref" in prop:
        prop = doc["schemas"][prop["$ref"]]
    return prop


def resolve(target: Target) -> dict[str, Any]:
    """The property schema (or request parameter) a target names. Raises KeyError when the document has no such
    field, so a mapping entry cannot name a field the API does not have."""
    doc_name, schema, field = target
    doc = document(doc_name)
    if schema.startswith("method:"):
        node: dict[str, Any] = doc
        *resources, method = schema.removeprefix("method:").split(".")
        for resource in resources:
            node = node["resources"][resource]
        return node["methods"][method]["parameters"][field]
    prop: dict[str, Any] = {"$ref": schema}
    for part in filter(None, field.split(".")):
        many = part.endswith("[]")
        prop = _step(doc, prop)["properties"][part.removesuffix("[]")]
        if many:
            prop = _step(doc, prop)["items"]
    return prop


def description(target: Target) -> str:
    """The field's description (for ``x[]``, the list field's own)."""
    doc, schema, field = target
    return resolve((doc, schema, field.removesuffix("[]"))).get("description", "")


# ------------------------------------------------------------------------------------------- checking


@dataclass(frozen=True)
class Violation:
    where: str  # resource and input path
    target: Target
    problem: str

    def __str__(self) -> str:
        doc, schema, field = self.target
        return f"{self.where}: {self.problem} ({doc} {schema}.{field})"


def _plain(value: Any) -> Any:
    """A value as the provider receives it, without the mock's secret wrapper."""
    if isinstance(value, dict) and "value" in value and any(len(k) == 32 for k in value if k != "value"):
        return value["value"]
    return value


def values_at(inputs: Mapping[str, Any], path: str) -> Iterator[tuple[str, Any]]:
    """(concrete path, value) for every value an input path reaches; nothing when an input is absent."""
    def walk(node: Any, parts: list[str], seen: str) -> Iterator[tuple[str, Any]]:
        node = _plain(node)
        if not parts:
            yield seen, node
            return
        part, rest = parts[0], parts[1:]
        many = part.endswith("[]")
        name = part.removesuffix("[]")
        if not isinstance(node, Mapping) or node.get(name) is None:
            return
        child = _plain(node[name])
        here = f"{seen}.{name}" if seen else name
        if many:
            for i, item in enumerate(child if isinstance(child, list) else [child]):
                yield from walk(item, rest, f"{here}[{i}]")
        else:
            yield from walk(child, rest, here)

    yield from walk(inputs, path.split("."), "")


_DURATION = re.compile(r"-?(\d+)(\.\d{1,9})?s")


def _seconds(text: str) -> float:
    return float(text.removesuffix("s"))


def check_value(doc_name: str, prop: dict[str, Any], value: Any, where: str, target: Target,
                strict_objects: bool) -> Iterator[Violation]:
    """The schema's own rules for one value: type, enum, format, pattern; objects field by field when
    ``strict_objects`` (a JSON document handed to the API as is), where an unknown field is a violation too."""
    doc = document(doc_name)
    prop = _step(doc, prop)

    def bad(problem: str) -> Violation:
        return Violation(where, target, problem)

    if prop.get("readOnly"):
        yield bad("output-only field: the API ignores or refuses it")
    kind = prop.get("type")
    if value == "" and kind == "string":
        return  # unset: the provider does not send it
    if kind == "string":
        fmt = prop.get("format")
        if fmt in ("int64", "uint64"):
            if not (isinstance(value, (int, float)) and float(value).is_integer()) and not (
                    isinstance(value, str) and re.fullmatch(r"-?\d+", value)):
                yield bad(f"{value!r} is not an {fmt}")
            return
        if not isinstance(value, str):
            yield bad(f"{value!r} is not a string")
            return
        if "enum" in prop and value not in prop["enum"]:
            yield bad(f"{value!r} is not one of {prop['enum']}")
        if fmt == "google-duration" and not _DURATION.fullmatch(value):
            yield bad(f"{value!r} is not a duration in seconds (e.g. '600s')")
        if "pattern" in prop and not re.fullmatch(prop["pattern"], value):
            yield bad(f"{value!r} does not match {prop['pattern']}")
    elif kind == "integer":
        not_a_number = isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer()
        if not_a_number and not (isinstance(value, str) and re.fullmatch(r"-?\d+", value)):
            yield bad(f"{value!r} is not an integer")
            return
        number = int(float(value))
        if prop.get("format") == "int32" and not -(2**31) <= number < 2**31:
            yield bad(f"{number} does not fit an int32")
        if prop.get("format") == "uint32" and not 0 <= number < 2**32:
            yield bad(f"{number} does not fit a uint32")
        if "minimum" in prop and number < float(prop["minimum"]):
            yield bad(f"{number} < minimum {prop['minimum']}")
        if "maximum" in prop and number > float(prop["maximum"]):
            yield bad(f"{number} > maximum {prop['maximum']}")
    elif kind == "number":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            yield bad(f"{value!r} is not a number")
    elif kind == "boolean":
        if not isinstance(value, bool):
            yield bad(f"{value!r} is not a boolean")
    elif kind == "array":
        if not isinstance(value, list):
            yield bad(f"{value!r} is not a list")
            return
        for i, item in enumerate(value):
            yield from check_value(doc_name, prop["items"], item, f"{where}[{i}]", target, strict_objects)
    elif kind == "object" or "properties" in prop:
        if not isinstance(value, Mapping):
            yield bad(f"{value!r} is not an object")
            return
        if "additionalProperties" in prop:
            for key, item in value.items():
                yield from check_value(doc_name, prop["additionalProperties"], item, f"{where}.{key}", target,
                                       strict_objects)
        elif strict_objects:
            fields = prop.get("properties", {})
            for key, item in value.items():
                if key not in fields:
                    yield bad(f"unknown field {key!r} (the API refuses it)")
                else:
                    yield from check_value(doc_name, fields[key], item, f"{where}.{key}", target, strict_objects)


def check_limit(limit: Limit, value: Any, where: str, target: Target) -> Iterator[Violation]:
    def bad(problem: str) -> Violation:
        return Violation(where, target, f"{problem} [{limit.quote or limit.source}]")

    if value == "" or value is None:
        return
    if limit.labels:
        if not isinstance(value, Mapping):
            yield bad(f"{value!r} is not a map of labels")
            return
        if len(value) > 64:
            yield bad(f"{len(value)} labels, more than 64")
        for key, item in value.items():
            if not re.fullmatch(LABEL_KEY, key):
                yield bad(f"label key {key!r} does not match {LABEL_KEY}")
            if not isinstance(item, str) or not re.fullmatch(LABEL_VALUE, item):
                yield bad(f"label value {item!r} does not match {LABEL_VALUE}")
        return
    if limit.choices and value not in limit.choices:
        yield bad(f"{value!r} is not one of {list(limit.choices)}")
    if limit.regex is not None:
        text = str(value).rsplit("/", 1)[-1] if limit.last_segment else str(value)
        if not re.fullmatch(limit.regex, text):
            yield bad(f"{text!r} does not match {limit.regex}")
    if limit.minimum is not None or limit.maximum is not None:
        if isinstance(value, str) and _DURATION.fullmatch(value):
            number = _seconds(value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str) and limit.regex is not None:
            number = float(len(value))  # a length limit on a name
        else:
            yield bad(f"{value!r} is not a number or duration")
            return
        if limit.minimum is not None and number < limit.minimum:
            yield bad(f"{value!r} below {limit.minimum:g}")
        if limit.maximum is not None and number > limit.maximum:
            yield bad(f"{value!r} above {limit.maximum:g}")


@dataclass
class Report:
    checked: int = 0
    violations: list[Violation] | None = None

    def __post_init__(self) -> None:
        self.violations = []


def check_resource(rtype: str, name: str, inputs: Mapping[str, Any], report: Report) -> None:
    """Every mapped input of one resource, against its field's schema and documented limit."""
    assert report.violations is not None
    for path, target in MAPPING.get(rtype, {}).items():
        for concrete, value in values_at(inputs, path):
            where = f"{rtype} {name} {concrete}"
            prop = resolve(target)
            if target[2] == "" or target[2].endswith("schema.fields"):
                # A JSON document the provider hands to the API as it is: parse it and check every field.
                try:
                    value = json.loads(value)
                except (TypeError, ValueError):
                    report.violations.append(Violation(where, target, "not a JSON document"))
                    continue
                report.checked += _count_leaves(value)
                report.violations.extend(check_value(target[0], prop, value, where, target, strict_objects=True))
                continue
            report.checked += 1
            report.violations.extend(check_value(target[0], prop, value, where, target, strict_objects=False))
            limit = LIMITS.get(target)
            if limit is not None:
                report.violations.extend(check_limit(limit, value, where, target))


def _count_leaves(value: Any) -> int:
    if isinstance(value, Mapping):
        return sum(_count_leaves(v) for v in value.values())
    if isinstance(value, list):
        return sum(_count_leaves(v) for v in value)
    return 1
