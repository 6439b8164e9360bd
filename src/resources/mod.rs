//! The custom resource kinds of `herald.dev/v1alpha1`, one module per kind.
//! A namespace plays the part of a Knock environment.

pub mod audience;
pub mod batch;
pub mod cancellation;
pub mod channel;
pub mod member_slice;
pub mod object;
pub mod recipient_page;
pub mod schedule;
pub mod schema;
pub mod tenant;
pub mod throttle;
pub mod trigger_run;
pub mod user;
pub mod workflow;

pub use audience::{Audience, AudienceSpec};
pub use batch::{Batch, BatchSpec};
pub use cancellation::{Cancellation, CancellationSpec};
pub use channel::{Channel, ChannelSpec, ChannelStatus, ChannelType};
pub use member_slice::{MemberSlice, MemberSliceSpec, MemberTarget};
pub use object::{Object, ObjectSpec, Subscription};
pub use recipient_page::{RecipientPage, RecipientPageSpec, RecipientPageStatus};
pub use schedule::{Schedule, ScheduleSpec, ScheduleStatus};
pub use tenant::{Tenant, TenantSpec};
pub use throttle::{Throttle, ThrottleSpec};
pub use trigger_run::{TriggerRun, TriggerRunSpec, TriggerRunStatus, WorkflowSnapshot};
pub use user::{User, UserSpec};
pub use workflow::{Workflow, WorkflowSpec, WorkflowStatus};

/// The API group.
pub const GROUP: &str = "herald.dev";
/// The API version.
pub const VERSION: &str = "v1alpha1";
