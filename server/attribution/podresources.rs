//! A client of the kubelet's pod-resources API (`v1.PodResourcesLister`,
//! Kubernetes' published interface, compiled from
//! `proto/k8s/podresources/v1/api.proto` by `build.rs`): which pod's
//! container holds which NVIDIA device, whether or not it runs anything on
//! it yet, so an allocated but idle GPU can be shown as such.
//!
//! Owns the connection to the kubelet's unix socket and what its absence or
//! failure means. No socket configured, or nothing at the path, is "no
//! kubelet here" (an empty answer and a [`KubeletStatus`] saying so), not
//! an error. A socket that is there but fails (refused, slow, forbidden)
//! is an [`Unattributed`] naming the socket; the channel is dropped and
//! the next call connects afresh, so a restarted kubelet is picked up
//! without a loop of retries. Every call is bounded by the configured
//! timeout. Only resources named `nvidia.com/…` are kept: whole GPUs, MIG
//! profiles (`nvidia.com/mig-1g.10gb`) and shared or time-sliced names.

use std::{error::Error as StdError, io, path::PathBuf, time::Duration};

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

use super::{Allocation, PodRef, Unattributed};

#[allow(clippy::all, clippy::pedantic, missing_docs, dead_code)]
pub mod pb {
    tonic::include_proto!("v1");
}

use pb::pod_resources_lister_client::PodResourcesListerClient;

/// The prefix of the extended resources NVIDIA's device plugin advertises.
pub const NVIDIA_RESOURCE_PREFIX: &str = "nvidia.com/";

/// Where the kubelet stands, as of the last call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KubeletStatus {
    /// Not asked yet.
    Unknown,
    /// `pod_resources_socket` is empty: the kubelet is turned off.
    Off,
    /// Nothing at the socket path: no kubelet on this host.
    NoSocket { path: PathBuf },
    /// The last call was answered.
    Answered,
    /// The socket is there but the last call failed; the reason names it.
    Failed { reason: String },
}

/// Devices of one resource the kubelet knows about (`GetAllocatableResources`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ResourceDevices {
    pub resource_name: String,
    pub device_ids: Vec<String>,
}

/// The client. Async; `host::HostSource` drives it from its own runtime.
#[derive(Debug)]
pub struct PodResources {
    socket: PathBuf,
    timeout: Duration,
    client: Option<PodResourcesListerClient<Channel>>,
    status: KubeletStatus,
}

impl PodResources {
    /// `socket` empty turns the kubelet off; `timeout` bounds a connect and
    /// each call.
    pub fn new(socket: impl Into<PathBuf>, timeout: Duration) -> Self {
        let socket = socket.into();
        let status = if socket.as_os_str().is_empty() {
            KubeletStatus::Off
        } else {
            KubeletStatus::Unknown
        };
        Self {
            socket,
            timeout,
            client: None,
            status,
        }
    }

    /// Whether the kubelet is turned off (no socket configured).
    pub fn is_off(&self) -> bool {
        self.socket.as_os_str().is_empty()
    }

    pub fn status(&self) -> &KubeletStatus {
        &self.status
    }

    pub fn socket(&self) -> &std::path::Path {
        &self.socket
    }

    /// `List`: every container's NVIDIA devices. `Ok(vec![])` without a
    /// kubelet (see [`Self::status`] for which).
    pub async fn list(&mut self) -> Result<Vec<Allocation>, Unattributed> {
        let Some(mut client) = self.client().await? else {
            return Ok(Vec::new());
        };
        let timeout = self.timeout;
        let answer =
            tokio::time::timeout(timeout, client.list(pb::ListPodResourcesRequest {})).await;
        match answer {
            Ok(Ok(response)) => {
                self.status = KubeletStatus::Answered;
                Ok(allocations_from(response.into_inner()))
            }
            Ok(Err(status)) => {
                Err(self.failed(format!("List failed: {}", describe_status(&status))))
            }
            Err(_) => Err(self.failed(format!(
                "List timed out after {}",
                humantime::format_duration(timeout)
            ))),
        }
    }

    /// `GetAllocatableResources`: the NVIDIA devices the kubelet knows.
    /// `Ok(None)` where the kubelet does not implement it (before 1.21, or
    /// with the feature gate off) or there is no kubelet.
    pub async fn allocatable(&mut self) -> Result<Option<Vec<ResourceDevices>>, Unattributed> {
        let Some(mut client) = self.client().await? else {
            return Ok(None);
        };
        let timeout = self.timeout;
        let answer = tokio::time::timeout(
            timeout,
            client.get_allocatable_resources(pb::AllocatableResourcesRequest {}),
        )
        .await;
        match answer {
            Ok(Ok(response)) => {
                self.status = KubeletStatus::Answered;
                Ok(Some(nvidia_devices(response.into_inner().devices)))
            }
            Ok(Err(status)) if status.code() == tonic::Code::Unimplemented => {
                self.status = KubeletStatus::Answered;
                Ok(None)
            }
            Ok(Err(status)) => Err(self.failed(format!(
                "GetAllocatableResources failed: {}",
                describe_status(&status)
            ))),
            Err(_) => Err(self.failed(format!(
                "GetAllocatableResources timed out after {}",
                humantime::format_duration(timeout)
            ))),
        }
    }

    /// The connected client, connecting first if needed; `Ok(None)` where
    /// there is no kubelet.
    async fn client(&mut self) -> Result<Option<PodResourcesListerClient<Channel>>, Unattributed> {
        if self.socket.as_os_str().is_empty() {
            self.status = KubeletStatus::Off;
            return Ok(None);
        }
        if let Some(client) = &self.client {
            return Ok(Some(client.clone()));
        }
        match std::fs::symlink_metadata(&self.socket) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.status = KubeletStatus::NoSocket {
                    path: self.socket.clone(),
                };
                return Ok(None);
            }
            _ => {}
        }
        let socket = self.socket.clone();
        // The URI is required by the endpoint but never dialled: the
        // connector opens the unix socket whatever it is asked for.
        // Calls are bounded by `tokio::time::timeout` around each one, so
        // a late answer reads as a timeout, not as tonic's `Cancelled`.
        let endpoint =
            Endpoint::from_static("http://kubelet.invalid").connect_timeout(self.timeout);
        let connector = tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move {
                Ok::<_, io::Error>(TokioIo::new(tokio::net::UnixStream::connect(socket).await?))
            }
        });
        let connected =
            tokio::time::timeout(self.timeout, endpoint.connect_with_connector(connector)).await;
        match connected {
            Ok(Ok(channel)) => {
                let client = PodResourcesListerClient::new(channel);
                self.client = Some(client.clone());
                Ok(Some(client))
            }
            Ok(Err(e)) => Err(self.failed(format!("cannot connect: {}", chain(&e)))),
            Err(_) => Err(self.failed(format!(
                "connect timed out after {}",
                humantime::format_duration(self.timeout)
            ))),
        }
    }

    /// Records a failure: the channel is dropped so the next call starts
    /// afresh.
    fn failed(&mut self, what: String) -> Unattributed {
        self.client = None;
        let reason = format!(
            "kubelet pod-resources socket {}: {what}",
            self.socket.display()
        );
        self.status = KubeletStatus::Failed {
            reason: reason.clone(),
        };
        Unattributed { reason }
    }
}

fn describe_status(status: &tonic::Status) -> String {
    let mut s = format!("{:?}", status.code());
    if !status.message().is_empty() {
        s.push_str(": ");
        s.push_str(status.message());
    }
    if let Some(source) = status.source() {
        s.push_str(": ");
        s.push_str(&chain(source));
    }
    s
}

/// An error and its sources, `: `-joined (tonic's transport error says
/// only "transport error" at the top).
fn chain(e: &(dyn StdError + 'static)) -> String {
    let mut s = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        let text = cause.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        next = cause.source();
    }
    s
}

/// A `List` answer → one [`Allocation`] per container and NVIDIA resource,
/// sorted.
pub fn allocations_from(response: pb::ListPodResourcesResponse) -> Vec<Allocation> {
    let mut out = Vec::new();
    for pod in response.pod_resources {
        for container in pod.containers {
            for devices in container.devices {
                if !devices.resource_name.starts_with(NVIDIA_RESOURCE_PREFIX)
                    || devices.device_ids.is_empty()
                {
                    continue;
                }
                out.push(Allocation {
                    pod: PodRef {
                        namespace: pod.namespace.clone(),
                        pod: pod.name.clone(),
                        container: container.name.clone(),
                    },
                    resource_name: devices.resource_name,
                    device_ids: devices.device_ids,
                });
            }
        }
    }
    out.sort();
    out
}

fn nvidia_devices(devices: Vec<pb::ContainerDevices>) -> Vec<ResourceDevices> {
    let mut out: Vec<ResourceDevices> = devices
        .into_iter()
        .filter(|d| d.resource_name.starts_with(NVIDIA_RESOURCE_PREFIX))
        .map(|d| ResourceDevices {
            resource_name: d.resource_name,
            device_ids: d.device_ids,
        })
        .collect();
    out.sort();
    out
}

/// The GPU a device-plugin id names: time-sliced replicas are reported as
/// `<uuid>::<n>`, every other id is the GPU or MIG UUID itself.
pub fn device_uuid(device_id: &str) -> &str {
    device_id
        .split_once("::")
        .map_or(device_id, |(uuid, _)| uuid)
}

#[cfg(test)]
/// The pod container a device is allocated to, when exactly one holds it.
/// A device shared between several containers (time-slicing, MPS) names
/// no single pod, so it gives `None`, as does an unallocated one.
/// `device_id` is a GPU or MIG UUID as NVML reports it.
pub fn pod_for<'a>(allocations: &'a [Allocation], device_id: &str) -> Option<&'a PodRef> {
    let mut holders = allocations
        .iter()
        .filter(|a| a.device_ids.iter().any(|d| device_uuid(d) == device_id))
        .map(|a| &a.pod);
    let first = holders.next()?;
    holders.all(|p| p == first).then_some(first)
}

/// An in-test kubelet: `v1.PodResourcesLister` over a unix socket, for this
/// module's tests and `host`'s.
#[cfg(any(test, feature = "testing"))]
pub mod fake_kubelet {
    use std::{path::Path, time::Duration};

    use tokio::net::UnixListener;
    use tokio_stream::wrappers::UnixListenerStream;
    use tonic::{Request, Response, Status};

    use super::pb::{
        self,
        pod_resources_lister_server::{PodResourcesLister, PodResourcesListerServer},
    };

    #[derive(Debug, Clone, Default)]
    pub struct FakeKubelet {
        pub pods: Vec<pb::PodResources>,
        /// `None` answers `GetAllocatableResources` with Unimplemented.
        pub allocatable: Option<Vec<pb::ContainerDevices>>,
        /// How long each answer takes.
        pub delay: Duration,
    }

    #[tonic::async_trait]
    impl PodResourcesLister for FakeKubelet {
        async fn list(
            &self,
            _: Request<pb::ListPodResourcesRequest>,
        ) -> Result<Response<pb::ListPodResourcesResponse>, Status> {
            tokio::time::sleep(self.delay).await;
            Ok(Response::new(pb::ListPodResourcesResponse {
                pod_resources: self.pods.clone(),
            }))
        }

        async fn get_allocatable_resources(
            &self,
            _: Request<pb::AllocatableResourcesRequest>,
        ) -> Result<Response<pb::AllocatableResourcesResponse>, Status> {
            tokio::time::sleep(self.delay).await;
            match &self.allocatable {
                Some(devices) => Ok(Response::new(pb::AllocatableResourcesResponse {
                    devices: devices.clone(),
                    cpu_ids: vec![0, 1],
                    memory: vec![],
                })),
                None => Err(Status::unimplemented(
                    "unknown method GetAllocatableResources",
                )),
            }
        }
    }

    /// A served kubelet on a runtime of its own, so that dropping it kills
    /// the server and every connection at once, as a kubelet that exits
    /// does (a graceful shutdown would keep open connections served).
    #[derive(Debug)]
    pub struct Served {
        runtime: Option<tokio::runtime::Runtime>,
    }

    impl Drop for Served {
        fn drop(&mut self) {
            if let Some(runtime) = self.runtime.take() {
                runtime.shutdown_background();
            }
        }
    }

    /// Serves `kubelet` at `socket`; works from async tests and plain ones.
    pub fn serve(kubelet: FakeKubelet, socket: &Path) -> std::io::Result<Served> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let listener = {
            let _entered = runtime.enter();
            UnixListener::bind(socket)?
        };
        runtime.spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(PodResourcesListerServer::new(kubelet))
                .serve_with_incoming(UnixListenerStream::new(listener))
                .await;
        });
        Ok(Served {
            runtime: Some(runtime),
        })
    }

    pub fn devices(resource: &str, ids: &[&str]) -> pb::ContainerDevices {
        pb::ContainerDevices {
            resource_name: resource.to_owned(),
            device_ids: ids.iter().map(|s| (*s).to_owned()).collect(),
            topology: Some(pb::TopologyInfo {
                nodes: vec![pb::NumaNode { id: 0 }],
            }),
        }
    }

    pub fn container(name: &str, devices: Vec<pb::ContainerDevices>) -> pb::ContainerResources {
        pb::ContainerResources {
            name: name.to_owned(),
            devices,
            cpu_ids: vec![],
            memory: vec![],
        }
    }

    pub fn pod(
        namespace: &str,
        name: &str,
        containers: Vec<pb::ContainerResources>,
    ) -> pb::PodResources {
        pb::PodResources {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            containers,
        }
    }

    /// A node: a training pod on two GPUs, an idle pod holding one, a MIG
    /// slice, a time-sliced replica, and resources that are not NVIDIA's.
    pub fn node() -> FakeKubelet {
        FakeKubelet {
            pods: vec![
                pod(
                    "ml",
                    "trainer-0",
                    vec![
                        container(
                            "trainer",
                            vec![
                                devices("nvidia.com/gpu", &["GPU-aaaa", "GPU-bbbb"]),
                                devices("example.com/nic", &["nic0"]),
                            ],
                        ),
                        container("sidecar", vec![]),
                    ],
                ),
                pod(
                    "ml",
                    "idle-notebook",
                    vec![container(
                        "notebook",
                        vec![devices("nvidia.com/gpu", &["GPU-cccc"])],
                    )],
                ),
                pod(
                    "infer",
                    "small",
                    vec![container(
                        "server",
                        vec![devices("nvidia.com/mig-1g.10gb", &["MIG-dddd"])],
                    )],
                ),
                pod(
                    "infer",
                    "shared",
                    vec![container(
                        "server",
                        vec![devices("nvidia.com/gpu.shared", &["GPU-eeee::1"])],
                    )],
                ),
                pod(
                    "kube-system",
                    "net",
                    vec![container(
                        "agent",
                        vec![devices("intel.com/sriov", &["vf1"])],
                    )],
                ),
            ],
            allocatable: Some(vec![
                devices(
                    "nvidia.com/gpu",
                    &["GPU-aaaa", "GPU-bbbb", "GPU-cccc", "GPU-ffff"],
                ),
                devices("nvidia.com/mig-1g.10gb", &["MIG-dddd"]),
                devices("example.com/nic", &["nic0", "nic1"]),
            ]),
            delay: Duration::ZERO,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::{fake_kubelet::*, *};

    type TestResult = Result<(), Box<dyn StdError>>;

    fn alloc(ns: &str, pod: &str, container: &str, resource: &str, ids: &[&str]) -> Allocation {
        Allocation {
            pod: PodRef {
                namespace: ns.to_owned(),
                pod: pod.to_owned(),
                container: container.to_owned(),
            },
            resource_name: resource.to_owned(),
            device_ids: ids.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    fn expected_node_allocations() -> Vec<Allocation> {
        let mut v = vec![
            alloc(
                "ml",
                "trainer-0",
                "trainer",
                "nvidia.com/gpu",
                &["GPU-aaaa", "GPU-bbbb"],
            ),
            alloc(
                "ml",
                "idle-notebook",
                "notebook",
                "nvidia.com/gpu",
                &["GPU-cccc"],
            ),
            alloc(
                "infer",
                "small",
                "server",
                "nvidia.com/mig-1g.10gb",
                &["MIG-dddd"],
            ),
            alloc(
                "infer",
                "shared",
                "server",
                "nvidia.com/gpu.shared",
                &["GPU-eeee::1"],
            ),
        ];
        v.sort();
        v
    }

    #[tokio::test]
    async fn list_gives_every_nvidia_allocation_including_idle_and_mig_and_nothing_else()
    -> TestResult {
        let dir = tempfile::tempdir()?;
        let socket = dir.path().join("kubelet.sock");
        let _served = serve(node(), &socket)?;
        let mut client = PodResources::new(&socket, Duration::from_secs(5));
        assert_eq!(client.list().await?, expected_node_allocations());
        assert_eq!(client.status(), &KubeletStatus::Answered);
        let allocatable = client.allocatable().await?;
        assert_eq!(
            allocatable,
            Some(vec![
                ResourceDevices {
                    resource_name: "nvidia.com/gpu".into(),
                    device_ids: vec![
                        "GPU-aaaa".into(),
                        "GPU-bbbb".into(),
                        "GPU-cccc".into(),
                        "GPU-ffff".into()
                    ],
                },
                ResourceDevices {
                    resource_name: "nvidia.com/mig-1g.10gb".into(),
                    device_ids: vec!["MIG-dddd".into()],
                },
            ])
        );
        Ok(())
    }

    #[tokio::test]
    async fn unimplemented_allocatable_is_not_an_error_and_keeps_the_connection() -> TestResult {
        let dir = tempfile::tempdir()?;
        let socket = dir.path().join("kubelet.sock");
        let _served = serve(
            FakeKubelet {
                allocatable: None,
                ..node()
            },
            &socket,
        )?;
        let mut client = PodResources::new(&socket, Duration::from_secs(5));
        assert_eq!(client.allocatable().await?, None);
        assert_eq!(client.status(), &KubeletStatus::Answered);
        assert!(client.client.is_some());
        assert_eq!(client.list().await?, expected_node_allocations());
        Ok(())
    }

    #[tokio::test]
    async fn no_socket_configured_or_none_at_the_path_is_no_kubelet() -> TestResult {
        let mut off = PodResources::new("", Duration::from_secs(1));
        assert_eq!(off.list().await?, vec![]);
        assert_eq!(off.allocatable().await?, None);
        assert_eq!(off.status(), &KubeletStatus::Off);

        let dir = tempfile::tempdir()?;
        let missing = dir.path().join("pod-resources/kubelet.sock");
        let mut absent = PodResources::new(&missing, Duration::from_secs(1));
        assert_eq!(absent.list().await?, vec![]);
        assert_eq!(absent.status(), &KubeletStatus::NoSocket { path: missing });
        Ok(())
    }

    #[tokio::test]
    async fn a_slow_kubelet_times_out_with_a_reason_naming_the_socket() -> TestResult {
        let dir = tempfile::tempdir()?;
        let socket = dir.path().join("kubelet.sock");
        let _served = serve(
            FakeKubelet {
                delay: Duration::from_secs(30),
                ..node()
            },
            &socket,
        )?;
        let mut client = PodResources::new(&socket, Duration::from_millis(200));
        let started = Instant::now();
        let err = client.list().await.err().ok_or("a slow List must fail")?;
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(
            err.reason.contains(&socket.display().to_string()),
            "{}",
            err.reason
        );
        assert!(
            err.reason.contains("List timed out after 200ms"),
            "{}",
            err.reason
        );
        assert_eq!(
            client.status(),
            &KubeletStatus::Failed { reason: err.reason }
        );
        assert!(client.client.is_none(), "a failure drops the channel");
        Ok(())
    }

    #[tokio::test]
    async fn a_dead_socket_fails_with_its_name_and_a_restarted_kubelet_is_picked_up() -> TestResult
    {
        let dir = tempfile::tempdir()?;
        let socket = dir.path().join("kubelet.sock");
        let served = serve(node(), &socket)?;
        let mut client = PodResources::new(&socket, Duration::from_secs(2));
        assert_eq!(client.list().await?.len(), 4);

        // The kubelet stops; its socket file stays behind.
        drop(served);
        let deadline = Instant::now() + Duration::from_secs(10);
        let err = loop {
            match client.list().await {
                Err(e) => break e,
                Ok(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                Ok(_) => return Err("the stopped kubelet kept answering".into()),
            }
        };
        assert!(
            err.reason.contains(&socket.display().to_string()),
            "{}",
            err.reason
        );
        // The runtime stops in the background: until its listener is
        // closed, a call may still connect and be reset. Once nothing
        // listens, a call fails to connect, naming the refusal.
        let err = loop {
            let err = client
                .list()
                .await
                .err()
                .ok_or("nothing listens: must fail")?;
            if err.reason.contains("cannot connect") || Instant::now() >= deadline {
                break err;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(err.reason.contains("cannot connect"), "{}", err.reason);
        assert!(
            err.reason.to_lowercase().contains("refused"),
            "{}",
            err.reason
        );

        // It comes back at the same path: the next call reconnects.
        std::fs::remove_file(&socket)?;
        let _served = serve(
            FakeKubelet {
                pods: vec![pod(
                    "ml",
                    "new",
                    vec![container(
                        "c",
                        vec![devices("nvidia.com/gpu", &["GPU-ffff"])],
                    )],
                )],
                ..node()
            },
            &socket,
        )?;
        assert_eq!(
            client.list().await?,
            vec![alloc("ml", "new", "c", "nvidia.com/gpu", &["GPU-ffff"])]
        );
        assert_eq!(client.status(), &KubeletStatus::Answered);
        Ok(())
    }

    #[test]
    fn pod_for_names_the_single_holder_of_a_device() {
        let allocations = expected_node_allocations();
        assert_eq!(
            pod_for(&allocations, "GPU-bbbb").map(|p| p.pod.as_str()),
            Some("trainer-0")
        );
        assert_eq!(
            pod_for(&allocations, "MIG-dddd").map(|p| p.pod.as_str()),
            Some("small")
        );
        assert_eq!(
            pod_for(&allocations, "GPU-eeee").map(|p| p.pod.as_str()),
            Some("shared")
        );
        assert_eq!(pod_for(&allocations, "GPU-ffff"), None);
        let mut shared = allocations.clone();
        shared.push(alloc(
            "infer",
            "other",
            "server",
            "nvidia.com/gpu.shared",
            &["GPU-eeee::2"],
        ));
        assert_eq!(
            pod_for(&shared, "GPU-eeee"),
            None,
            "two holders name no single pod"
        );
    }
}
