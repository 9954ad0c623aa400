//! Fan-out and fan-in over many hosts: one task per host on the shared
//! runtime (never a thread per host), each bounded by the per-host timeout,
//! results handed back as they arrive.
//!
//! A dead host costs at most `--timeout`, and only its own row: the others'
//! results are delivered the moment they are ready.

use std::{collections::HashMap, future::Future};

use tokio::task::JoinSet;

use crate::{
    connect::{Client, Connector, HostFailure},
    hosts::HostSpec,
};

/// Per-host results, in completion order.
#[derive(Debug)]
pub struct Fleet<T> {
    tasks: JoinSet<(usize, Result<T, HostFailure>)>,
    ids: HashMap<tokio::task::Id, usize>,
}

impl<T: Send + 'static> Fleet<T> {
    /// Connects to every host and runs `work` on each connection, all at
    /// once. Connecting and the work together get the connector's timeout.
    pub fn run<F, Fut>(hosts: &[HostSpec], connector: &Connector, work: F) -> Self
    where
        F: Fn(usize, Client) -> Fut + Clone + Send + 'static,
        Fut: Future<Output = Result<T, HostFailure>> + Send + 'static,
    {
        let timeout = connector.timeout();
        let mut tasks = JoinSet::new();
        let mut ids = HashMap::with_capacity(hosts.len());
        for (i, host) in hosts.iter().enumerate() {
            let connector = connector.clone();
            let host = host.clone();
            let work = work.clone();
            let handle = tasks.spawn(async move {
                let result = tokio::time::timeout(timeout, async move {
                    let client = connector.connect(&host).await?;
                    work(i, client).await
                })
                .await
                .unwrap_or(Err(HostFailure::Timeout(timeout)));
                (i, result)
            });
            ids.insert(handle.id(), i);
        }
        Self { tasks, ids }
    }

    /// The next host to finish, or None when all have.
    pub async fn next(&mut self) -> Option<(usize, Result<T, HostFailure>)> {
        let joined = self.tasks.join_next_with_id().await?;
        Some(match joined {
            Ok((_, result)) => result,
            Err(e) => {
                // Only a panic gets here; report it on that host's row.
                let i = self.ids.get(&e.id()).copied().unwrap_or(0);
                (i, Err(HostFailure::Connect(format!("internal error: {e}"))))
            }
        })
    }

    /// Every result, in host order.
    pub async fn collect(mut self, hosts: usize) -> Vec<Option<Result<T, HostFailure>>> {
        let mut out: Vec<Option<Result<T, HostFailure>>> = (0..hosts).map(|_| None).collect();
        while let Some((i, result)) = self.next().await {
            if let Some(slot) = out.get_mut(i) {
                *slot = Some(result);
            }
        }
        out
    }
}
