//! The control loop and the effects layer: the one place plans are carried
//! out.
//!
//! The [`Controller`] runs the [`Sampler`] and, on the same loop, feeds
//! each GPU's observations and every operator request to the planners,
//! then executes what they planned, in order: desired state to the
//! [`StateStore`], events to the [`EventLog`], writes to the GPUs' device
//! threads, replies to the callers, policies to the [`Hub`]. Persistence is
//! acknowledged: a write waits for the desired state persisted before it in
//! its plan to be durable, and a reply waits for everything its request
//! changed (events and desired state); the loop itself never waits for a
//! disk. Every call to the store and the log is in the executor below.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{
    actor::WriteQueue,
    api::{
        BudgetChange, EventKind, GovernorAction, GpuPolicy, PowerBudget, SetPowerBudgetResponse,
        SetThresholdResponse, event::Change,
    },
    config::ControllerConfig,
    events::{Actor, EventLog, NewEvent},
    hub::Hub,
    persist::{Ack, AckSet},
    sampler::{Observed, Sampler},
    state::{SavedBudget, StateStore},
};

use super::{
    BudgetTarget, ControlRequest,
    dispatch::{Finish, PendingReplies, WRITE_TIMEOUT, WriteDone, Writes, reply_when_durable},
    error::ControlError,
    gpu::GpuControl,
    lifecycle,
    node_budget::{self, NodeBudget},
    plan::{DesiredChange, Effect, Origin, Plan, Write},
    requests::{self, Awaiting, RequestPlan},
    wire,
};

/// The warning for a saved value dropped as out of range for its GPU.
fn saved_value_dropped(facts: &crate::backend::DeviceFacts, problem: String) -> NewEvent {
    tracing::warn!("state: {problem}");
    NewEvent::new(EventKind::StateDamaged, Actor::startup(), problem)
        .gpu(facts.index, &facts.uuid)
        .severity(crate::api::Severity::Warning)
}

/// How long shutdown waits for restores.
const SHUTDOWN_RESTORE_TIMEOUT: Duration = Duration::from_secs(10);

/// The control loop: sampler, governors, operator requests.
pub struct Controller {
    sampler: Sampler,
    /// Where writes to each GPU go, by position.
    queues: Vec<WriteQueue>,
    gpus: Vec<GpuControl>,
    hub: Arc<Hub>,
    events: Arc<EventLog>,
    store: StateStore,
    config: ControllerConfig,
    writes: Writes,
    replies: PendingReplies,
    last_policies: Vec<GpuPolicy>,
    /// The node power budget, when one is set.
    budget: Option<NodeBudget>,
    /// Share changes not yet in a redistribution event (position: the
    /// share before the first, after the last), and when the last event
    /// was recorded.
    budget_changes: std::collections::BTreeMap<usize, (Option<u32>, Option<u32>)>,
    last_budget_event: Option<SystemTime>,
    /// SetPowerBudget replies waiting for the lowers the request started (so
    /// that when the caller hears OK, the limits that may be in force fit), with
    /// when they began waiting; answered anyway after [`WRITE_TIMEOUT`].
    budget_replies: Vec<(
        super::Reply<SetPowerBudgetResponse>,
        SetPowerBudgetResponse,
        crate::persist::AckSet,
        std::time::Instant,
    )>,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("gpus", &self.gpus.len())
            .field("writes_in_flight", &self.writes.len())
            .finish_non_exhaustive()
    }
}

impl Controller {
    /// Builds the control state of every GPU from config, persisted state
    /// and device facts.
    pub fn new(
        sampler: Sampler,
        hub: Arc<Hub>,
        events: Arc<EventLog>,
        mut store: StateStore,
        config: ControllerConfig,
    ) -> Self {
        let mut gpus = Vec::with_capacity(sampler.len());
        for pos in 0..sampler.len() {
            let facts = sampler.facts(pos);
            // Saved values out of range for this GPU never reach a planner.
            for problem in store.sanitize(facts) {
                events.record(saved_value_dropped(facts, problem));
            }
            let (gpu, warning) = GpuControl::new(facts, &config, &store.get(&facts.uuid));
            if let Some(warning) = warning {
                events.record(warning);
            }
            gpus.push(gpu);
        }
        let budget = store.power_budget().map(|b| NodeBudget {
            watts: b.watts,
            set_by: b.set_by.clone(),
            set_at: SystemTime::UNIX_EPOCH + Duration::from_secs(b.set_at_unix_s),
        });
        if budget.is_some() {
            // Every GPU joins the budget at the limit it has, from its
            // first reading on.
            for gpu in &mut gpus {
                gpu.budget_active = true;
            }
        }
        let mut controller = Self {
            queues: sampler.write_queues(),
            sampler,
            gpus,
            hub,
            events,
            store,
            config,
            writes: Writes::default(),
            replies: PendingReplies::default(),
            last_policies: Vec::new(),
            budget,
            budget_changes: Default::default(),
            last_budget_event: None,
            budget_replies: Vec::new(),
        };
        controller.publish_policies();
        controller
    }

    fn publish_policies(&mut self) {
        let policies: Vec<GpuPolicy> = self
            .gpus
            .iter()
            .enumerate()
            .map(|(pos, gpu)| wire::policy(gpu, self.sampler.facts(pos)))
            .collect();
        if policies != self.last_policies {
            self.hub.set_policies(policies.clone());
            self.last_policies = policies;
        }
        self.hub.set_power_budget(self.power_budget_wire());
    }

    /// The budget as the wire shows it.
    fn power_budget_wire(&self) -> Option<PowerBudget> {
        let budget = self.budget.as_ref()?;
        let facts = self.sampler.all_facts();
        let (min_mw, max_mw) = node_budget::allowed_range_mw(&facts);
        Some(PowerBudget {
            watts: budget.watts,
            set_by: budget.set_by.clone(),
            set_at: Some(prost_types::Timestamp::from(budget.set_at)),
            counted_mw: node_budget::counted_total_mw(&self.gpus, &facts),
            min_mw,
            max_mw,
        })
    }

    /// One round of the node budget (when one is set): lowers, then the
    /// raises that fit; share changes gathered into a rate-limited event.
    fn budget_round(&mut self, now: SystemTime) {
        let Some(watts) = self.budget.as_ref().map(|b| b.watts) else {
            return;
        };
        let round = {
            let facts = self.sampler.all_facts();
            node_budget::redistribute(&mut self.gpus, &facts, watts)
        };
        self.carry_out(round, now);
    }

    fn carry_out(&mut self, round: node_budget::Round, now: SystemTime) {
        for (pos, before, after) in round.changes {
            self.budget_changes
                .entry(pos)
                .and_modify(|c| c.1 = after)
                .or_insert((before, after));
        }
        for (pos, plan) in round.plans {
            self.execute(pos, plan);
        }
        self.budget_changes
            .retain(|_, (before, after)| before != after);
        let due = self.last_budget_event.is_none_or(|last| {
            now.duration_since(last).unwrap_or_default()
                >= node_budget::REDISTRIBUTION_EVENT_INTERVAL
        });
        if due && !self.budget_changes.is_empty() {
            let changes: Vec<_> = std::mem::take(&mut self.budget_changes)
                .into_iter()
                .map(|(pos, (before, after))| (pos, before, after))
                .collect();
            let facts = self.sampler.all_facts();
            let shares = node_budget::shares(&changes, &facts);
            let watts = self.budget.as_ref().map(|b| b.watts);
            let reason = format!(
                "node power budget{}: shares {}",
                watts.map_or(String::new(), |w| format!(" of {w:.0} W")),
                shares
                    .iter()
                    .map(|s| format!(
                        "GPU {} {} -> {}",
                        s.index,
                        s.before_mw
                            .map_or("none".to_owned(), |mw| format!("{} W", mw / 1000)),
                        s.after_mw
                            .map_or("none".to_owned(), |mw| format!("{} W", mw / 1000))
                    ))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            self.events.record(
                NewEvent::new(EventKind::PowerBudgetRedistributed, Actor::budget(), reason).change(
                    Change::Budget(BudgetChange {
                        before_watts: watts,
                        after_watts: watts,
                        shares,
                    }),
                ),
            );
            self.last_budget_event = Some(now);
        }
    }

    /// Answers the SetPowerBudget requests whose writes have all finished
    /// (or that waited a write timeout: a GPU that does not answer keeps its
    /// last limit counted, and the caller is not kept waiting on it).
    fn answer_budget_replies(&mut self) {
        if self.budget_replies.is_empty() {
            return;
        }
        // Settled: what every GPU may have in force (share, confirmed limit,
        // writes under way) fits the budget.
        let settled = self.budget.as_ref().is_none_or(|b| {
            let facts = self.sampler.all_facts();
            node_budget::counted_total_mw(&self.gpus, &facts) as f64 <= b.watts * 1000.0
        });
        let waiting = std::mem::take(&mut self.budget_replies);
        for (reply, response, durable, since) in waiting {
            if settled || since.elapsed() >= WRITE_TIMEOUT {
                reply_when_durable(reply, Ok(response), durable);
            } else {
                self.budget_replies.push((reply, response, durable, since));
            }
        }
    }

    /// SetPowerBudget: checks the value against this host's range, sets or
    /// drops the budget (persisted, recorded with who did it), and runs a
    /// round at once, so the lowers a smaller budget needs are under way
    /// when the caller is answered.
    fn set_power_budget(
        &mut self,
        target: BudgetTarget,
        caller: &str,
    ) -> Result<(SetPowerBudgetResponse, crate::persist::AckSet), ControlError> {
        let now = SystemTime::now();
        let (min_mw, max_mw) = node_budget::allowed_range_mw(&self.sampler.all_facts());
        let new = match target {
            BudgetTarget::Watts(watts) => {
                let mw = watts * 1000.0;
                if !watts.is_finite() || watts <= 0.0 || mw < min_mw as f64 || mw > max_mw as f64 {
                    return Err(ControlError::BudgetOutOfRange {
                        watts,
                        min_mw,
                        max_mw,
                    });
                }
                Some(NodeBudget {
                    watts,
                    set_by: caller.to_owned(),
                    set_at: now,
                })
            }
            BudgetTarget::Drop => None,
        };
        let previous = self.power_budget_wire();
        let before: Vec<Option<u32>> = self.gpus.iter().map(|g| g.budget_share_mw).collect();
        let mut durable = crate::persist::AckSet::default();
        durable.push(self.store.set_power_budget(new.as_ref().map(|b| {
            SavedBudget {
                watts: b.watts,
                set_by: b.set_by.clone(),
                set_at_unix_s: b
                    .set_at
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
            }
        })));
        let before_watts = self.budget.as_ref().map(|b| b.watts);
        let after_watts = new.as_ref().map(|b| b.watts);
        self.budget = new;
        let round = {
            let facts = self.sampler.all_facts();
            match after_watts {
                Some(watts) => {
                    node_budget::activate(&mut self.gpus, &facts);
                    node_budget::redistribute(&mut self.gpus, &facts, watts)
                }
                None => node_budget::release(&mut self.gpus, &facts),
            }
        };
        // The request's own event carries every GPU's share before and
        // after; the redistribution that follows is recorded as usual.
        self.carry_out(round, now);
        let facts = self.sampler.all_facts();
        let changes: Vec<_> = self
            .gpus
            .iter()
            .zip(&before)
            .enumerate()
            .map(|(pos, (g, before))| (pos, *before, g.budget_share_mw))
            .collect();
        let shares = node_budget::shares(&changes, &facts);
        let reason = match after_watts {
            Some(w) => format!("node power budget set to {w:.0} W"),
            None => "node power budget dropped".to_owned(),
        };
        durable.push(
            self.events
                .record(
                    NewEvent::new(
                        EventKind::PowerBudgetChanged,
                        Actor::operator(caller),
                        reason,
                    )
                    .change(Change::Budget(BudgetChange {
                        before_watts,
                        after_watts,
                        shares: shares.clone(),
                    })),
                )
                .durable(),
        );
        Ok((
            SetPowerBudgetResponse {
                previous,
                power_budget: self.power_budget_wire(),
                shares,
            },
            durable,
        ))
    }

    /// Runs until `shutdown`, then gives back every GPU the governor lowered.
    pub async fn run(
        mut self,
        mut requests: mpsc::Receiver<ControlRequest>,
        shutdown: CancellationToken,
    ) {
        for pos in 0..self.gpus.len() {
            // A GPU lost at start is announced when it is back, with the
            // mode its real facts give it (not the observe-only its unknown
            // facts would).
            if self.gpus[pos].lifecycle.is_lost() {
                continue;
            }
            if let Some(event) = self.gpus[pos].mode_announcement(self.sampler.facts(pos)) {
                self.events.record(event);
            }
        }
        let mut ticker = self.sampler.ticker();
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                Some(done) = self.writes.next(), if !self.writes.is_empty() => self.on_write_done(done),
                Some(request) = requests.recv() => self.on_request(request),
                _ = ticker.tick() => self.tick().await,
            }
        }
        requests.close();
        while let Ok(request) = requests.try_recv() {
            request.refuse(ControlError::ShuttingDown);
        }
        self.shutdown_restore().await;
    }

    /// The first tick, before the daemon serves: reads every GPU, clears
    /// what a previous run left behind and re-applies the operator's
    /// ceilings, and waits (bounded) for those writes, so that by the time
    /// clients connect the GPUs are in their intended state and the repairs
    /// are in the event log.
    pub async fn start(&mut self) {
        self.tick().await;
        if !self.writes.is_empty() {
            tracing::info!(
                writes = self.writes.len(),
                "startup repairs under way (a stop asked for now waits for them)"
            );
        }
        self.drain_writes(WRITE_TIMEOUT).await;
    }

    /// Waits up to `limit` for the writes under way; true when all finished.
    async fn drain_writes(&mut self, limit: Duration) -> bool {
        tokio::time::timeout(limit, async {
            while let Some(done) = self.writes.next().await {
                self.on_write_done(done);
            }
        })
        .await
        .is_ok()
    }

    /// One sampler tick, then what each GPU's observation calls for.
    pub async fn tick(&mut self) {
        let states: Vec<_> = self
            .gpus
            .iter()
            .enumerate()
            .map(|(pos, g)| (self.sampler.facts(pos).index, wire::governor_state(g)))
            .collect();
        let observed = self
            .sampler
            .tick(|index| {
                states
                    .iter()
                    .find(|(i, _)| *i == index)
                    .map_or(crate::api::GovernorState::Unspecified, |(_, s)| *s)
            })
            .await;
        let now = SystemTime::now();
        for (pos, observation) in observed.into_iter().enumerate() {
            let Some(gpu) = self.gpus.get_mut(pos) else {
                continue;
            };
            let facts = self.sampler.facts(pos);
            let plan = match observation {
                Observed::Nothing => continue,
                Observed::Reading(reading) => lifecycle::reading(gpu, facts, &reading, now),
                Observed::Lost => lifecycle::lost(gpu),
                Observed::Recovered(reading) => {
                    // Checked again against the facts it came back with.
                    for problem in self.store.sanitize(facts) {
                        self.events.record(saved_value_dropped(facts, problem));
                    }
                    let saved = self.store.get(&facts.uuid);
                    let mut plan = lifecycle::recovered(gpu, facts, &self.config, &saved);
                    if let Some(reading) = reading {
                        plan.extend(lifecycle::reading(gpu, facts, &reading, now));
                    }
                    plan
                }
            };
            self.execute(pos, plan);
        }
        self.budget_round(now);
        self.answer_budget_replies();
        self.publish_policies();
    }

    /// Carries out one GPU's plan, in order. A write goes to the GPU only
    /// once the desired state persisted before it in the plan is durable
    /// (persist, then write); returns the acknowledgements no write waited
    /// for (its events, later state), for a reply that must.
    fn execute(&mut self, pos: usize, plan: Plan) -> Vec<Ack> {
        let mut gate = Vec::new();
        let mut rest = Vec::new();
        for effect in plan.effects {
            match effect {
                Effect::Write(write) => {
                    let mut acks = AckSet::default();
                    for ack in gate.drain(..) {
                        acks.push(ack);
                    }
                    self.send(pos, write, acks);
                }
                Effect::Persist(change) => gate.push(self.persist(pos, change)),
                effect => rest.extend(self.record(pos, effect)),
            }
        }
        rest.extend(gate);
        rest
    }

    /// Carries out a request's effects; writes go at once, and the returned
    /// set acknowledges everything the request changed, for its reply.
    fn execute_request<R>(&mut self, plan: RequestPlan<R>) -> (Awaiting<R>, AckSet) {
        let mut durable = AckSet::default();
        for (pos, effect) in plan.effects {
            match effect {
                Effect::Write(write) => self.send(pos, write, AckSet::default()),
                Effect::Persist(change) => durable.push(self.persist(pos, change)),
                effect => {
                    if let Some(ack) = self.record(pos, effect) {
                        durable.push(ack);
                    }
                }
            }
        }
        (plan.reply, durable)
    }

    /// Queues a desired-state change for the writer.
    fn persist(&mut self, pos: usize, change: DesiredChange) -> Ack {
        let uuid = &self.sampler.facts(pos).uuid;
        self.store.update(uuid, |s| change.apply(s))
    }

    /// Records an event effect; `None` for any other effect.
    fn record(&mut self, pos: usize, effect: Effect) -> Option<Ack> {
        match effect {
            Effect::Record(event) => Some(self.events.record(event).durable()),
            Effect::RecordGovernorAction(event) => {
                let recorded = self.events.record(event);
                let event = recorded.event();
                if let Some(gpu) = self.gpus.get_mut(pos) {
                    gpu.last_action = Some(GovernorAction {
                        time: event.time,
                        description: wire::describe_change(event),
                        event_seq: event.seq,
                    });
                }
                Some(recorded.durable())
            }
            Effect::Persist(_) | Effect::Write(_) => None,
        }
    }

    /// Sends a write to GPU `pos` once `gate` is acknowledged.
    fn send(&mut self, pos: usize, write: Write, gate: AckSet) {
        match self.queues.get(pos) {
            Some(queue) => self.writes.send(pos, write, queue, gate),
            None => tracing::error!(gpu = pos, "no device thread to write to"),
        }
    }

    fn on_write_done(&mut self, done: WriteDone) {
        let WriteDone {
            gpu: pos,
            write,
            result,
            finish,
        } = done;
        let Some(gpu) = self.gpus.get_mut(pos) else {
            return;
        };
        let facts = self.sampler.facts(pos);
        let index = facts.index;
        if let Err(e) = &result {
            tracing::warn!(gpu = index, error = %e, op = ?write.op, "write failed");
        }
        let plan = match finish {
            Finish::InTime | Finish::Cancelled => {
                lifecycle::write_done(gpu, facts, &write, &result)
            }
            Finish::StillRunning => lifecycle::write_still_running(facts, &write),
            Finish::Late => lifecycle::late_write_done(gpu, facts, &write, &result),
        };
        let recorded = self.execute(pos, plan);
        // The raises a landed lower makes room for wait for the next tick:
        // budget writes are planned on readings, whose device clock spaces
        // them (between ticks that clock is stale).
        self.answer_budget_replies();
        // The caller was answered when the write timed out; its late
        // completion is recorded, not answered twice.
        if finish != Finish::Late
            && let Origin::Operator {
                reply, slot, part, ..
            } = write.origin
        {
            self.replies
                .write_done(reply, slot, part, index, &result, recorded);
        }
        self.publish_policies();
    }

    fn on_request(&mut self, request: ControlRequest) {
        let facts = self.sampler.all_facts();
        match request {
            ControlRequest::SetPowerLimit {
                gpus,
                target,
                caller,
                reply,
            } => {
                let id = self.replies.next_id();
                match requests::set_power_limit(
                    &mut self.gpus,
                    &facts,
                    &gpus,
                    target,
                    &caller.name,
                    id,
                ) {
                    Ok(plan) => {
                        let (awaiting, durable) = self.execute_request(plan);
                        self.replies.power_limit(id, awaiting, reply, durable);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
            ControlRequest::ResetClocks {
                gpus,
                caller,
                reply,
            } => {
                let id = self.replies.next_id();
                match requests::reset_clocks(&mut self.gpus, &facts, &gpus, &caller.name, id) {
                    Ok(plan) => {
                        let (awaiting, durable) = self.execute_request(plan);
                        self.replies.clocks(id, awaiting, reply, durable);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
            ControlRequest::SetThreshold {
                gpus,
                target,
                hysteresis_c,
                caller,
                reply,
            } => {
                match requests::set_threshold(
                    &mut self.gpus,
                    &facts,
                    &gpus,
                    target,
                    hysteresis_c,
                    &caller.name,
                ) {
                    Ok(plan) => {
                        let (awaiting, durable) = self.execute_request(plan);
                        let result = awaiting
                            .finish()
                            .map(|results| SetThresholdResponse { results });
                        reply_when_durable(reply, result, durable);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
            ControlRequest::SetPowerBudget {
                target,
                caller,
                reply,
            } => match self.set_power_budget(target, &caller.name) {
                Ok((response, durable)) => {
                    self.budget_replies
                        .push((reply, response, durable, std::time::Instant::now()));
                    self.answer_budget_replies();
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
        }
        self.publish_policies();
    }

    /// Gives back every GPU the governor lowered, and records it.
    async fn shutdown_restore(mut self) {
        self.events.record(NewEvent::new(
            EventKind::DaemonStopping,
            Actor::shutdown(),
            "daemon stopping",
        ));
        // Let writes already under way finish first.
        self.drain_writes(SHUTDOWN_RESTORE_TIMEOUT).await;
        for pos in 0..self.gpus.len() {
            let plan = lifecycle::shutdown(&mut self.gpus[pos], self.sampler.facts(pos));
            self.execute(pos, plan);
        }
        let restoring = self.writes.len();
        if restoring > 0 {
            tracing::info!(gpus = restoring, "restoring GPUs the governor lowered");
        }
        if !self.drain_writes(SHUTDOWN_RESTORE_TIMEOUT).await {
            tracing::error!(
                "some GPUs did not answer the restore in time; the next start will clear their throttle"
            );
        }
    }
}
